//! Production tokens: RS256 and ES256 verified against a JWKS file, next to HS256.
#![allow(clippy::unwrap_used, missing_docs)]

use ferry_core::ReplicaId;
use ferry_core::protocol::{ErrorCode, ServerMsg};
use ferry_relay::auth::{Claims, now_secs};
use ferry_testkit::relay::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn claims() -> Claims {
    Claims {
        sub: "device-7".into(),
        exp: now_secs() + 600,
        read: vec!["*".into()],
        write: vec!["*".into()],
        primary: vec![],
        iss: None,
        aud: None,
        nbf: None,
        iat: None,
    }
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey) -> String {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, &claims(), key).unwrap()
}

#[test]
fn rs256_and_es256_tokens_from_a_jwks_file() {
    let d = tempfile::tempdir().unwrap();
    let jwks = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwks.json");
    let relay = RelayProc::start_with(
        &d.path().join("relay"),
        &format!("jwks_file = \"{}\"\n", jwks.display()),
    );
    let rsa = EncodingKey::from_rsa_pem(&fixture("rs256-private.pem")).unwrap();
    let ec = EncodingKey::from_ec_pem(&fixture("es256-private.pem")).unwrap();
    let other = EncodingKey::from_rsa_pem(&fixture("rs256-other-private.pem")).unwrap();
    // Accepted: both algorithms through the real client, and HS256 still works.
    for (name, token) in [
        ("RS256", sign(Algorithm::RS256, Some("rsa-1"), &rsa)),
        ("ES256", sign(Algorithm::ES256, Some("ec-1"), &ec)),
        ("HS256", admin_token("dev")),
    ] {
        let r = open(d.path(), &format!("{name}.db"));
        r.execute("INSERT INTO tag(id, name) VALUES (?1, 'x')", &[name.into()])
            .unwrap();
        let h = connect(&r, &relay.url(), token);
        wait_synced(&h);
        eprintln!("ok: {name} accepted");
    }
    // Refused with a reason.
    let public_pem = jwks_public_pem_as_hmac_secret();
    let cases = [
        (
            "signed by an unknown key",
            sign(Algorithm::RS256, Some("rsa-1"), &other),
            "signature",
        ),
        (
            "unknown kid",
            sign(Algorithm::RS256, Some("rsa-9"), &rsa),
            "rsa-9",
        ),
        (
            "algorithm does not match the key",
            sign(Algorithm::ES256, Some("rsa-1"), &ec),
            "does not match",
        ),
        (
            "no kid with several keys",
            sign(Algorithm::RS256, None, &rsa),
            "kid",
        ),
        (
            "RS384 not accepted",
            sign(Algorithm::RS384, Some("rsa-1"), &rsa),
            "not accepted",
        ),
        (
            "alg confusion: HS256 keyed with the public key",
            sign(
                Algorithm::HS256,
                None,
                &EncodingKey::from_secret(&public_pem),
            ),
            "signature",
        ),
    ];
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, token, mention) in cases {
        rt.block_on(async {
            let mut ws = raw::connect(&relay.url()).await;
            raw::send(&mut ws, &raw::hello(ReplicaId::generate(), &token, 0)).await;
            match raw::recv(&mut ws).await {
                Some(ServerMsg::Error { code, message }) => {
                    assert_eq!(code, ErrorCode::Unauthorized, "{name}: {message}");
                    assert!(
                        message.contains(mention),
                        "{name}: {message:?} should mention {mention:?}"
                    );
                }
                other => panic!("{name}: expected unauthorized, got {other:?}"),
            }
        });
        eprintln!("ok: {name} refused");
    }
}

/// The bytes an attacker would use as an HMAC secret in an algorithm-confusion attack.
fn jwks_public_pem_as_hmac_secret() -> Vec<u8> {
    let j: serde_json::Value = serde_json::from_slice(&fixture("jwks.json")).unwrap();
    j["keys"][0]["n"].as_str().unwrap().as_bytes().to_vec()
}
