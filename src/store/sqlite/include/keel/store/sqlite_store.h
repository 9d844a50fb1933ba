#pragma once
// The embedded Store on SQLite 3: WAL journal, synchronous=FULL (every commit is on disk
// before it is acknowledged), and group commit: one writer thread gathers the writes
// that arrive while the previous commit is syncing and commits them together, each in
// its own savepoint so that one failing write does not undo the others. Reads run on a
// small pool of read-only connections and never wait for the writer.

#include <memory>
#include <string>

#include "keel/core/clock.h"
#include "keel/core/random.h"
#include "keel/store/store.h"

namespace keel::store {

struct SqliteOptions {
  /// Database file; its directory is created if missing. ":memory:" is refused
  /// (readers need a shared file).
  std::string path;
  /// Writes committed together at most. Default: 1024.
  int max_batch = 1024;
  /// Read connections. Default: 4.
  int read_connections = 4;
};

/// The schema version this keel writes.
int SqliteSchemaVersion();

/// The schema version of the database at `path` (PRAGMA user_version), without changing
/// it; 0 when the file does not exist or has no keel schema yet.
Result<int> ReadSqliteSchemaVersion(const std::string& path);

/// Opens (creating and migrating as needed) the database. `clock` and `random` must
/// outlive the store.
Result<std::unique_ptr<Store>> OpenSqliteStore(const SqliteOptions& options, const Clock& clock,
                                               Random& random);

}  // namespace keel::store
