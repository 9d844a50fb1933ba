#pragma once
// What the SQL stores (SQLite, PostgreSQL) have in common underneath the Store logic: a
// connection that prepares statements, and a statement that binds parameters and steps
// through rows. The Store logic (sql_store.h) is written once against these; each
// backend implements them over its own client library.
//
// SQL given to Prepare is written in the subset both backends accept, with parameters
// numbered `?1`, `?2`, ... (a backend rewrites them as it needs). A Conn and the Stmts it
// hands out are used by one thread at a time; a Stmt is valid until it goes out of scope,
// and two Stmts of the same SQL text must not be in use at once.
//
// Failures inside a backend travel as SqlError (never outside the store: the Store calls
// turn them into a Result at their edge).

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "keel/core/clock.h"
#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel::store::sql {

struct SqlError : std::runtime_error {
  enum class Kind {
    kStatement,   // the statement failed; the connection is fine
    kRetry,       // a deadlock or serialization failure: run the transaction again
    kConnection,  // the connection is gone (the server restarted, the network broke)
  };
  explicit SqlError(const std::string& message, Kind k = Kind::kStatement) : std::runtime_error(message), kind(k) {}
  Kind kind;
};

/// One prepared statement in use: implemented per backend.
class StmtImpl {
 public:
  virtual ~StmtImpl() = default;
  virtual void BindInt(int i, int64_t v) = 0;
  virtual void BindText(int i, std::string_view v) = 0;
  virtual void BindNull(int i) = 0;
  /// Executes on first call; true while a row is available.
  virtual bool Step() = 0;
  /// Executes a statement whose rows and change count are not needed. A backend may
  /// send it without waiting: it then runs, in order, before the next statement that is
  /// read, and its error (if any) is raised there. Default: runs it to the end.
  virtual void Send() {
    while (Step()) {
    }
  }
  virtual bool IsNull(int c) const = 0;
  virtual int64_t Int(int c) const = 0;
  virtual std::string Text(int c) const = 0;
  /// Makes the statement ready for its next use (bindings and results cleared).
  virtual void Reset() = 0;
};

/// A statement handle: binds by parameter number (1-based), reads columns (0-based), and
/// resets the statement when it goes out of scope.
class Stmt {
 public:
  explicit Stmt(StmtImpl* impl) : impl_(impl) {}
  ~Stmt() { impl_->Reset(); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  Stmt& Bind(int i, int64_t v) { impl_->BindInt(i, v); return *this; }
  Stmt& Bind(int i, int v) { impl_->BindInt(i, v); return *this; }
  Stmt& Bind(int i, std::string_view v) { impl_->BindText(i, v); return *this; }
  Stmt& Bind(int i, const std::string& v) { return Bind(i, std::string_view(v)); }
  Stmt& Bind(int i, const char* v) { return Bind(i, std::string_view(v)); }
  Stmt& BindNull(int i) { impl_->BindNull(i); return *this; }
  Stmt& BindJson(int i, const json::value& v) {
    if (v.is_null()) return BindNull(i);
    return Bind(i, json::serialize(v));
  }
  /// An empty string binds NULL.
  Stmt& BindOptText(int i, std::string_view v) { return v.empty() ? BindNull(i) : Bind(i, v); }

  /// Steps once; true when a row is available.
  bool Step() { return impl_->Step(); }
  /// Steps to the end (for statements whose rows do not matter; Changes() is then the
  /// statement's).
  void Run() {
    while (Step()) {
    }
  }
  /// Runs a statement whose rows and change count do not matter, possibly later (see
  /// StmtImpl::Send); the Stmt must not be read after.
  void Send() { impl_->Send(); }

  bool IsNull(int c) const { return impl_->IsNull(c); }
  int64_t Int(int c) const { return impl_->Int(c); }
  std::string Text(int c) const { return impl_->Text(c); }
  /// Column `c` decoded with keel's codec for stored documents (ParseStoredJson: the
  /// limits keel writes under); NULL reads as null. A value that breaks them (a disk
  /// fault, an older version's data) is an error the caller turns into data: see
  /// ColumnReader in sql_store.cc.
  Result<json::value> DecodeJson(int c) const {
    if (IsNull(c)) return json::value(nullptr);
    return ParseStoredJson(Text(c));
  }
  std::optional<Timestamp> OptTime(int c) const {
    if (IsNull(c)) return std::nullopt;
    return FromMillis(Int(c));
  }

 private:
  StmtImpl* impl_;
};

/// A connection inside a transaction of the store's making.
class Conn {
 public:
  virtual ~Conn() = default;
  /// Prepares (or takes from the connection's cache) `sql`, written with ?N parameters.
  virtual Stmt Prepare(const std::string& sql) = 0;
  /// Rows changed by the last INSERT, UPDATE or DELETE executed on this connection.
  virtual int64_t Changes() const = 0;

  // Concurrency control. A backend whose writes run one at a time (SQLite's single
  // writer) needs none; one with concurrent transactions (PostgreSQL) locks by key until
  // its transaction ends.

  /// Waits for the lock on `key`, held until the transaction ends. `shared`: several
  /// holders at once, none exclusive.
  virtual void Lock(std::string_view key, bool shared = false) = 0;
  /// Takes the exclusive lock on `key` if no one holds it; false otherwise.
  virtual bool TryLock(std::string_view key) = 0;
  /// Appended to a SELECT of queue or task rows to take: rows locked by another
  /// transaction are skipped, the one returned is locked ("" when writes are serial).
  virtual std::string_view SkipLocked() const = 0;
};

}  // namespace keel::store::sql
