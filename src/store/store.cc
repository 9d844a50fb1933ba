#include "keel/store/store.h"

#include <algorithm>
#include <thread>

namespace keel::store {

std::string_view RunStatusName(RunStatus s) {
  switch (s) {
    case RunStatus::kQueued: return "queued";
    case RunStatus::kRunning: return "running";
    case RunStatus::kWaiting: return "waiting";
    case RunStatus::kSucceeded: return "succeeded";
    case RunStatus::kFailed: return "failed";
    case RunStatus::kCancelled: return "cancelled";
    case RunStatus::kDeadLettered: return "dead_lettered";
  }
  return "queued";
}

std::optional<RunStatus> RunStatusFromName(std::string_view name) {
  for (auto s : kAllRunStatuses) {
    if (RunStatusName(s) == name) return s;
  }
  return std::nullopt;
}

bool IsTerminal(RunStatus s) {
  return s == RunStatus::kSucceeded || s == RunStatus::kFailed || s == RunStatus::kCancelled ||
         s == RunStatus::kDeadLettered;
}

std::string_view StepStatusName(StepStatus s) {
  switch (s) {
    case StepStatus::kRunning: return "running";
    case StepStatus::kRetrying: return "retrying";
    case StepStatus::kSucceeded: return "succeeded";
    case StepStatus::kFailed: return "failed";
    case StepStatus::kWaiting: return "waiting";
  }
  return "running";
}

std::string_view TaskStatusName(TaskRecord::Status s) {
  switch (s) {
    case TaskRecord::Status::kPending: return "pending";
    case TaskRecord::Status::kLeased: return "leased";
    case TaskRecord::Status::kCompleted: return "completed";
    case TaskRecord::Status::kFailed: return "failed";
  }
  return "pending";
}

void Store::WaitForTask(const std::string&, Duration max) {
  std::this_thread::sleep_for(std::min(max, Duration(50)));
}

void Store::SetWorkListener(std::function<void()>) {}

uint64_t Store::AddTaskListener(std::function<void()>) { return 0; }

void Store::RemoveTaskListener(uint64_t) {}

std::string ItemStepId(const std::string& step_id, int64_t index) { return step_id + "#" + std::to_string(index); }

json::value ErrorToJson(const Error& error) {
  json::object o;
  o["type"] = ErrorCodeName(error.code);
  o["message"] = error.message;
  if (!error.param.empty()) o["param"] = error.param;
  if (error.retry_after) o["retry_after_ms"] = error.retry_after->count();
  return o;
}

Error ErrorFromJson(const json::value& v) {
  Error e;
  if (!v.is_object()) return e;
  const auto& o = v.get_object();
  if (const auto* t = o.if_contains("type"); t && t->is_string()) {
    e.code = ErrorCodeFromName(std::string_view(t->get_string())).value_or(ErrorCode::kInternal);
  }
  if (const auto* m = o.if_contains("message"); m && m->is_string()) e.message = m->get_string();
  if (const auto* p = o.if_contains("param"); p && p->is_string()) e.param = p->get_string();
  if (const auto* r = o.if_contains("retry_after_ms"); r && r->is_int64()) e.retry_after = Duration(r->get_int64());
  return e;
}

}  // namespace keel::store
