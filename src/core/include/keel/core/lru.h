#pragma once
// LruMap: a map bounded by a number of entries that forgets the least recently used one
// first. Thread-safe (one mutex; every call is O(1) on average). Values are copied out,
// so a V that is expensive to copy should be a shared_ptr.

#include <cstddef>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>

namespace keel {

template <typename V>
class LruMap {
 public:
  /// Precondition: max_entries >= 1.
  explicit LruMap(std::size_t max_entries) : max_entries_(max_entries < 1 ? 1 : max_entries) {}

  /// The value of `key`, marked most recently used; nullopt when absent.
  std::optional<V> Get(const std::string& key) {
    std::lock_guard lock(mu_);
    const auto it = index_.find(key);
    if (it == index_.end()) return std::nullopt;
    order_.splice(order_.begin(), order_, it->second);
    return it->second->second;
  }

  /// Stores (or replaces) the value of `key` as the most recently used; past
  /// max_entries, the least recently used entry is dropped.
  void Put(const std::string& key, V value) {
    std::lock_guard lock(mu_);
    if (const auto it = index_.find(key); it != index_.end()) {
      it->second->second = std::move(value);
      order_.splice(order_.begin(), order_, it->second);
      return;
    }
    order_.emplace_front(key, std::move(value));
    index_[key] = order_.begin();
    if (order_.size() > max_entries_) {
      index_.erase(order_.back().first);
      order_.pop_back();
    }
  }

  /// Forgets `key` (nothing when absent).
  void Erase(const std::string& key) {
    std::lock_guard lock(mu_);
    if (const auto it = index_.find(key); it != index_.end()) {
      order_.erase(it->second);
      index_.erase(it);
    }
  }

  std::size_t size() const {
    std::lock_guard lock(mu_);
    return order_.size();
  }

 private:
  using Order = std::list<std::pair<std::string, V>>;  // most recently used first
  const std::size_t max_entries_;
  mutable std::mutex mu_;
  Order order_;                                             // GUARDED_BY(mu_)
  std::unordered_map<std::string, typename Order::iterator> index_;  // GUARDED_BY(mu_)
};

}  // namespace keel
