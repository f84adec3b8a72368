//! The process's TLS provider, for the HTTPS clients the engine makes (registries, S3).

/// Installs ring as the process's rustls provider; a second install is refused harmlessly.
/// ring rather than aws-lc-rs: the latter's C build doubles the server's build time, and
/// neither a pull nor a blob transfer needs post-quantum key exchange (what the deprecation
/// is about).
pub(crate) fn install_provider() {
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
}
