//! The HTTPS client c2m calls the outside world with (providers' APIs, brands' webhooks): rustls
//! on ring with the Mozilla roots, so no system OpenSSL and no aws-lc in the build.

use std::{sync::Arc, time::Duration};

/// An HTTPS client with rustls on ring and the Mozilla roots (no system OpenSSL, no aws-lc);
/// `http2_only` for APNs, which speaks nothing else (ALPN `h2`, or prior knowledge in clear).
pub fn client(timeout: Duration, http2_only: bool) -> Result<reqwest::Client, reqwest::Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut builder = reqwest::Client::builder();
    if http2_only {
        tls.alpn_protocols = vec![b"h2".to_vec()];
        builder = builder.http2_prior_knowledge();
    }
    builder
        .use_preconfigured_tls(tls)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
}
