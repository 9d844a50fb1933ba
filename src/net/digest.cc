#include "keel/net/digest.h"

#include <openssl/evp.h>

namespace keel::net {
namespace {

std::string DigestHex(std::string_view data, const EVP_MD* md) {
  unsigned char out[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out, &len, md, nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  hex.reserve(len * 2);
  for (unsigned int i = 0; i < len; ++i) {
    hex.push_back(kHex[out[i] >> 4]);
    hex.push_back(kHex[out[i] & 15]);
  }
  return hex;
}

}  // namespace

std::string Sha256Hex(std::string_view data) { return DigestHex(data, EVP_sha256()); }
std::string Sha1Hex(std::string_view data) { return DigestHex(data, EVP_sha1()); }

}  // namespace keel::net
