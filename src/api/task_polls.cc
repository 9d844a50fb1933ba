#include "task_polls.h"

#include <boost/asio/dispatch.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <utility>
#include <vector>

#include "keel/core/cancel.h"

namespace keel::api {

namespace {
using SteadyClock = std::chrono::steady_clock;
// How often a waiting poll looks again by itself: for a store that does not notify, or a
// notification missed.
constexpr std::chrono::seconds kLookEvery{1};
}  // namespace

struct TaskPolls::Waiter {
  Waiter(std::string q, std::string w, SteadyClock::time_point u, net::Responder r)
      : queue(std::move(q)),
        worker_id(std::move(w)),
        until(u),
        respond(std::move(r)),
        gone(respond.client_gone()),
        timer(respond.executor()) {}

  enum class State { kWaiting, kLeasing, kEnded };

  const std::string queue;
  const std::string worker_id;
  const SteadyClock::time_point until;
  const net::Responder respond;
  const std::shared_ptr<CancelSignal> gone;
  boost::asio::steady_timer timer;  // used on respond.executor() only

  // GUARDED_BY(TaskPolls::mu_):
  State state = State::kWaiting;
  bool expired = false;  // its time ran out while a sweep was leasing for it
  bool listed = false;
  Queue::iterator where;
  uint64_t gone_handle = 0;
};

TaskPolls::TaskPolls(store::Store& store, net::WorkerPool& pool, Answer answer)
    : store_(store), pool_(pool), answer_(std::move(answer)) {}

TaskPolls::~TaskPolls() { Stop(); }

std::size_t TaskPolls::waiting() const {
  std::lock_guard lock(mu_);
  return waiting_;
}

void TaskPolls::Wait(std::string queue, std::string worker_id, std::chrono::milliseconds wait,
                     net::Responder respond) {
  auto w = std::make_shared<Waiter>(std::move(queue), std::move(worker_id),
                                    SteadyClock::now() + wait, std::move(respond));
  {
    std::lock_guard lock(mu_);
    if (!stopped_) {
      Queue& q = queues_[w->queue];
      w->where = q.insert(q.end(), w);
      w->listed = true;
      ++waiting_;
    }
  }
  if (!w->listed) return answer_(w->respond, std::optional<store::TaskRecord>());
  // Weak: the signal lives as long as the connection, which must not keep the poll alive.
  std::weak_ptr<Waiter> weak = w;
  const uint64_t handle = w->gone->OnCancel([this, weak] {
    auto gone = weak.lock();
    if (!gone) return;
    bool ended = false;
    {
      std::lock_guard lock(mu_);
      if (gone->state == Waiter::State::kWaiting) {
        gone->state = Waiter::State::kEnded;
        Unlist(*gone);
        ended = true;
      }  // a sweep leasing for it looks at the signal when its lease call returns
    }
    if (ended) {
      boost::asio::post(gone->respond.executor(), [gone] { gone->timer.cancel(); });
    }
  });
  bool ended;
  {
    std::lock_guard lock(mu_);
    w->gone_handle = handle;
    ended = w->state == Waiter::State::kEnded;
  }
  if (ended) w->gone->Remove(TakeGoneHandle(*w));
  ArmTimer(w);
  // A task queued between the poll's first look and now finds it here.
  Notify();
}

void TaskPolls::ArmTimer(const std::shared_ptr<Waiter>& w) {
  boost::asio::dispatch(w->respond.executor(), [this, w] {
    const auto now = SteadyClock::now();
    w->timer.expires_at(std::min(w->until, now + kLookEvery));
    w->timer.async_wait([this, w](boost::system::error_code ec) {
      if (ec) return;  // cancelled: the poll ended
      bool ended = false, again = false;
      {
        std::lock_guard lock(mu_);
        if (w->state == Waiter::State::kEnded) return;
        if (SteadyClock::now() >= w->until) {
          if (w->state == Waiter::State::kWaiting) {
            w->state = Waiter::State::kEnded;
            Unlist(*w);
            ended = true;
          } else {
            w->expired = true;  // the sweep leasing for it answers
          }
        } else {
          again = true;
        }
      }
      if (ended) {
        w->gone->Remove(TakeGoneHandle(*w));
        return answer_(w->respond, std::optional<store::TaskRecord>());
      }
      if (again) {
        Notify();
        ArmTimer(w);
      }
    });
  });
}

uint64_t TaskPolls::TakeGoneHandle(Waiter& w) {
  std::lock_guard lock(mu_);
  return std::exchange(w.gone_handle, 0);
}

void TaskPolls::Unlist(Waiter& w) {
  if (!w.listed) return;
  auto it = queues_.find(w.queue);
  it->second.erase(w.where);
  if (it->second.empty()) queues_.erase(it);
  w.listed = false;
  --waiting_;
}

void TaskPolls::Notify() {
  if (sweep_queued_.exchange(true)) {
    sweep_again_.store(true);
    return;
  }
  if (!pool_.Submit([this] { Sweep(); })) {
    // The pool is full or stopped: the waiters' own timers look again.
    sweep_queued_.store(false);
  }
}

void TaskPolls::Sweep() {
  do {
    sweep_again_.store(false);
    std::vector<std::string> names;
    {
      std::lock_guard lock(mu_);
      for (const auto& [name, q] : queues_) names.push_back(name);
    }
    for (const std::string& name : names) {
      while (true) {
        std::shared_ptr<Waiter> w;
        {
          std::lock_guard lock(mu_);
          auto it = queues_.find(name);
          if (it == queues_.end()) break;
          for (const auto& candidate : it->second) {
            if (candidate->state == Waiter::State::kWaiting) {
              w = candidate;
              break;
            }
          }
          if (!w) break;
          w->state = Waiter::State::kLeasing;
        }
        const bool gone_before = w->gone->cancelled();
        Outcome outcome = gone_before ? Outcome(std::optional<store::TaskRecord>())
                                      : store_.LeaseTask(name, w->worker_id);
        const bool leased = outcome.ok() && outcome->has_value();
        bool answer = true;
        {
          std::lock_guard lock(mu_);
          if (!gone_before && outcome.ok() && !leased && !w->expired && !stopped_) {
            // Nothing for it yet: it goes on waiting, first in line.
            w->state = Waiter::State::kWaiting;
            answer = false;
          } else {
            w->state = Waiter::State::kEnded;
            Unlist(*w);
          }
        }
        if (!answer) break;
        boost::asio::post(w->respond.executor(), [w] { w->timer.cancel(); });
        w->gone->Remove(TakeGoneHandle(*w));
        // A poller that hung up gets nothing; one that hangs up after its lease was taken
        // leaves the task to its heartbeat timeout (docs/api.md).
        if (!gone_before) answer_(w->respond, std::move(outcome));
        if (!outcome.ok() || (!leased && !gone_before)) break;
      }
    }
  } while (sweep_again_.exchange(false));
  sweep_queued_.store(false);
  if (sweep_again_.exchange(false)) Notify();
}

void TaskPolls::Stop() {
  std::vector<std::shared_ptr<Waiter>> ended;
  {
    std::lock_guard lock(mu_);
    if (stopped_) return;
    stopped_ = true;
    // What a sweep is leasing for stays listed until the sweep ends it.
    for (auto it = queues_.begin(); it != queues_.end();) {
      Queue& q = it->second;
      for (auto w = q.begin(); w != q.end();) {
        if ((*w)->state != Waiter::State::kWaiting) {
          ++w;
          continue;
        }
        (*w)->state = Waiter::State::kEnded;
        (*w)->listed = false;
        ended.push_back(*w);
        w = q.erase(w);
        --waiting_;
      }
      it = q.empty() ? queues_.erase(it) : std::next(it);
    }
  }
  for (const auto& w : ended) {
    boost::asio::post(w->respond.executor(), [w] { w->timer.cancel(); });
    w->gone->Remove(TakeGoneHandle(*w));
    answer_(w->respond, std::optional<store::TaskRecord>());
  }
}

}  // namespace keel::api
