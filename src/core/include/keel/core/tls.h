#pragma once
// How keel's outbound calls to one upstream (a provider, an `http` step's host) use TLS.
// Plain data: the config (keel/core/config.h) fills it, the HTTP clients (keel/net) apply
// it. Certificate verification is always on; what can change is which CAs are trusted
// and whether keel presents a client certificate (mTLS).

#include <string>

namespace keel {

struct TlsSettings {
  /// PEM file of the CA certificates to trust instead of the system bundle (a private CA,
  /// e.g. for a self-hosted vLLM). Default: empty (the system's CA bundle).
  std::string ca_file;
  /// PEM file of keel's client certificate (chain) for mTLS. Set with client_key.
  /// Default: none.
  std::string client_cert;
  /// PEM file of the client certificate's private key (unencrypted). Default: none.
  std::string client_key;

  bool operator==(const TlsSettings&) const = default;
  bool empty() const { return ca_file.empty() && client_cert.empty() && client_key.empty(); }
};

}  // namespace keel
