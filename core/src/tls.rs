//! Which relays a device trusts over `wss://`.
//!
//! A device trusts what its operating system trusts (`rustls-platform-verifier`): the roots
//! the user, an MDM profile or the enterprise installed, with the platform's own revocation
//! and policy checks, rather than a list compiled into the app that never learns of a
//! private CA. An app whose relay uses a private CA adds it (`SyncOptions::ca_certificates_pem`),
//! and an app that wants to survive a compromised public CA pins the relay's public keys
//! (`SyncOptions::pinned_keys`): a chain that verifies but contains none of the pinned keys
//! is refused. Pins name SubjectPublicKeyInfo digests (`sha256/<base64>`, as OkHttp and
//! HPKP did), so a renewed certificate with the same key keeps working; pin a backup key too.
//!
//! On Android the operating system's store is reached through the JVM, which the bindings
//! do not hand to the library yet: there the device trusts Mozilla's roots plus the app's CAs.

use crate::error::{Error, Result};
use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// What a device trusts beyond the operating system's roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Extra root certificates (PEM), e.g. a company's private CA.
    pub ca_certificates_pem: Vec<String>,
    /// Public-key pins, `sha256/<base64 of the SHA-256 of the SubjectPublicKeyInfo>`; when any
    /// are given, the relay's chain must contain one of these keys.
    pub pinned_keys: Vec<String>,
}

impl Trust {
    /// The TLS client configuration for this trust, or `InvalidInput` naming what is wrong
    /// (a PEM without certificates, a malformed pin).
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = Vec::new();
        for (i, pem) in self.ca_certificates_pem.iter().enumerate() {
            let before = roots.len();
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.push(cert.map_err(|e| {
                    Error::InvalidInput(format!("CA certificate {i} is not valid PEM: {e}"))
                })?);
            }
            if roots.len() == before {
                return Err(Error::InvalidInput(format!(
                    "CA certificate {i} holds no PEM certificate"
                )));
            }
        }
        let pins = self
            .pinned_keys
            .iter()
            .map(|p| parse_pin(p))
            .collect::<Result<Vec<_>>>()?;
        let verifier = platform(roots, Arc::clone(&provider))
            .map_err(|e| Error::InvalidInput(format!("cannot set up TLS verification: {e}")))?;
        let verifier: Arc<dyn ServerCertVerifier> = if pins.is_empty() {
            verifier
        } else {
            Arc::new(Pinned {
                inner: verifier,
                pins,
            })
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidInput(format!("TLS setup: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

fn parse_pin(pin: &str) -> Result<[u8; 32]> {
    let bad = |why: &str| Error::InvalidInput(format!("pinned key `{pin}` {why}"));
    let b64 = pin
        .strip_prefix("sha256/")
        .ok_or_else(|| bad("must start with `sha256/`"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| bad("is not base64 after `sha256/`"))?;
    bytes
        .try_into()
        .map_err(|_| bad("is not a SHA-256 digest (32 bytes)"))
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo, as pins name it.
fn spki_sha256(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(Sha256::digest(parsed.subject_public_key_info().as_ref()).into())
}

#[cfg(not(target_os = "android"))]
fn platform(
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
) -> std::result::Result<Arc<dyn ServerCertVerifier>, rustls::Error> {
    Ok(Arc::new(
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider)?,
    ))
}

#[cfg(target_os = "android")]
fn platform(
    extra: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
) -> std::result::Result<Arc<dyn ServerCertVerifier>, rustls::Error> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    for c in extra {
        roots.add(c)?;
    }
    rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map(|v| v as Arc<dyn ServerCertVerifier>)
        .map_err(|e| rustls::Error::General(e.to_string()))
}

/// A verifier that also requires one of the pinned keys in the verified chain.
#[derive(Debug)]
struct Pinned {
    inner: Arc<dyn ServerCertVerifier>,
    pins: Vec<[u8; 32]>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let pinned = std::iter::once(end_entity)
            .chain(intermediates)
            .filter_map(spki_sha256)
            .any(|h| self.pins.contains(&h));
        if pinned {
            Ok(verified)
        } else {
            Err(rustls::Error::General(
                "the relay's certificate chain holds none of the pinned keys".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bad_pins_and_certificates_are_named() {
        let t = |ca: &[&str], pins: &[&str]| Trust {
            ca_certificates_pem: ca.iter().map(|s| s.to_string()).collect(),
            pinned_keys: pins.iter().map(|s| s.to_string()).collect(),
        };
        assert!(t(&[], &[]).client_config().is_ok());
        let pin = format!(
            "sha256/{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        );
        assert!(t(&[], &[&pin]).client_config().is_ok());
        for (ca, pins, says) in [
            (vec!["not a certificate"], vec![], "holds no PEM"),
            (vec![], vec!["md5/AAAA"], "must start with"),
            (vec![], vec!["sha256/!!"], "not base64"),
            (vec![], vec!["sha256/AAAA"], "32 bytes"),
        ] {
            let e = t(&ca, &pins).client_config().unwrap_err();
            assert!(
                matches!(&e, Error::InvalidInput(m) if m.contains(says)),
                "{e}"
            );
        }
    }
}
