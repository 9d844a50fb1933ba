#include "keel/core/secrets.h"

#include <algorithm>
#include <mutex>

namespace keel {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string PercentDecode(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (std::size_t i = 0; i < in.size(); ++i) {
    if (in[i] == '%' && i + 2 < in.size()) {
      const int hi = HexValue(in[i + 1]);
      const int lo = HexValue(in[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out.push_back(in[i]);
  }
  return out;
}

// The form a string takes inside a JSON string literal (what an upstream that echoes a
// header in a JSON error body writes).
std::string JsonEscaped(std::string_view in) {
  std::string out;
  out.reserve(in.size());
  for (const char c : in) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '/':
        out += "\\/";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

}  // namespace

void SecretRedactor::Add(std::string_view secret) {
  if (secret.size() < kMinLength) return;
  std::string forms[] = {std::string(secret), JsonEscaped(secret), PercentDecode(secret)};
  std::unique_lock lock(mu_);
  for (auto& form : forms) {
    if (form.size() < kMinLength) continue;
    if (std::find(secrets_.begin(), secrets_.end(), form) != secrets_.end()) continue;
    secrets_.push_back(std::move(form));
  }
  std::stable_sort(secrets_.begin(), secrets_.end(),
                   [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
}

void SecretRedactor::AddUrlPasswords(std::string_view url) {
  const auto scheme = url.find("://");
  if (scheme != std::string_view::npos) {
    const std::size_t start = scheme + 3;
    const std::size_t end = std::min(url.find_first_of("/?#", start), url.size());
    const auto authority = url.substr(start, end - start);
    if (const auto at = authority.rfind('@'); at != std::string_view::npos) {
      const auto userinfo = authority.substr(0, at);
      if (const auto colon = userinfo.find(':'); colon != std::string_view::npos) {
        Add(userinfo.substr(colon + 1));
      }
    }
  }
  for (std::size_t p = url.find("password="); p != std::string_view::npos;
       p = url.find("password=", p + 1)) {
    if (p > 0 && url[p - 1] != '?' && url[p - 1] != '&' && url[p - 1] != ' ') continue;
    const std::size_t v = p + 9;
    const std::size_t e = std::min(url.find_first_of("& #", v), url.size());
    Add(url.substr(v, e - v));
  }
}

std::string SecretRedactor::Redact(std::string_view text) const {
  std::string out(text);
  std::shared_lock lock(mu_);
  for (const auto& secret : secrets_) {
    for (std::size_t p = out.find(secret); p != std::string::npos;
         p = out.find(secret, p + kMask.size())) {
      out.replace(p, secret.size(), kMask);
    }
  }
  return out;
}

bool SecretRedactor::empty() const {
  std::shared_lock lock(mu_);
  return secrets_.empty();
}

void SecretRedactor::Clear() {
  std::unique_lock lock(mu_);
  secrets_.clear();
}

SecretRedactor& Secrets() {
  static SecretRedactor* const instance = new SecretRedactor();
  return *instance;
}

std::string RedactSecrets(std::string_view text) { return Secrets().Redact(text); }

}  // namespace keel
