#pragma once
// The Store on PostgreSQL, for many keel nodes sharing one database (docs/scale-out.md).
//
// - Every write is one READ COMMITTED transaction on a pooled connection. A write that
//   acts on a run first takes the run's transaction-scoped advisory lock, so that a
//   run's writes are serial whichever node makes them; leasing takes queue rows with
//   `FOR UPDATE SKIP LOCKED` and passes over runs whose lock is held, so workers never
//   queue behind each other. Durability is PostgreSQL's: a commit that returned is on
//   disk (with the server's default synchronous_commit).
// - Reads run in REPEATABLE READ READ ONLY transactions: a consistent snapshot.
// - Nodes tell each other that work is due with NOTIFY (coalesced: one NOTIFY carries
//   any number of commits) and LISTEN on a connection of their own, so idle workers wake
//   at once instead of polling.
// - The pool reconnects by itself: after a server restart the dead connections are
//   dropped and new ones made on demand. A transaction that failed before its COMMIT was
//   sent is retried once on a fresh connection; one whose COMMIT got no answer is
//   reported kUnavailable ("outcome unknown"), never retried blindly.
// - The schema is versioned (table keel_schema); Open creates or migrates it under an
//   advisory lock, so that nodes starting together do not race, and refuses a database
//   of a newer version.
//
// Thread-safe. Timestamps come from the injected clock, so nodes need synchronised
// clocks (NTP); skew eats into lease_timeout.

#include <memory>
#include <string>

#include "keel/core/clock.h"
#include "keel/core/random.h"
#include "keel/store/store.h"

namespace keel::store {

struct PostgresOptions {
  /// A libpq connection URI: postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?PARAM=...].
  std::string url;
  /// Connections in the pool, opened on demand. Default: 16. Range: 1..1000.
  int pool_size = 16;
  /// Bound on opening one connection. Default: 5s.
  Duration connect_timeout{5000};
  /// Bound on waiting for a free connection of the pool. Default: 5s.
  Duration pool_timeout{5000};
  /// Server-side bound on one statement (0: none). Default: 30s.
  Duration statement_timeout{30000};
  /// Listen for other nodes' notifications (work due, tasks queued). Default: true.
  bool listen = true;
};

/// The schema version this keel writes (the same numbering as SQLite's).
int PostgresSchemaVersion();

/// The schema version of the database, without changing it; 0 when it has no keel schema
/// yet. kUnavailable when the server cannot be reached.
Result<int> ReadPostgresSchemaVersion(const PostgresOptions& options);

/// Connects, creates or migrates the schema, and starts the listener. Errors name the
/// server (never the password) and what to fix. `clock` and `random` must outlive the
/// store.
Result<std::unique_ptr<Store>> OpenPostgresStore(const PostgresOptions& options, const Clock& clock,
                                                 Random& random);

}  // namespace keel::store
