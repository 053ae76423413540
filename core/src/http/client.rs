//! The reqwest client every attempt goes through: HTTP/1.1 only, no redirects, the configured
//! forward proxy (never the environment's), the
//! guarded resolver for every host name, the extra trusted roots, and, for an endpoint with a
//! client certificate, that certificate.

use std::sync::Arc;
use std::time::Duration;

use super::resolver::GuardedResolver;
use super::{ClientIdentity, HttpConfig, ProxyUrl};

/// `trusted_proxy`: the proxy is webhook.proxy (a superuser's choice), whose own addresses the
/// guard does not refuse; an endpoint's own proxy is checked like any target.
pub(super) fn build_client(
    config: &HttpConfig,
    identity: Option<&ClientIdentity>,
    proxy: Option<&ProxyUrl>,
    trusted_proxy: bool,
) -> Result<reqwest::Client, String> {
    // Through a proxy this resolver is asked for the proxy's address only (the proxy resolves
    // the target; `exchange` checks the target itself first).
    let resolver = GuardedResolver::new(config.policy.clone(), &config.dns_servers).exempt(
        proxy
            .filter(|_| trusted_proxy)
            .map(|p| p.host().to_string()),
    );
    let mut builder = reqwest::Client::builder()
        .user_agent(config.user_agent.clone())
        .redirect(reqwest::redirect::Policy::none())
        // Never the environment's (HTTPS_PROXY and the like): only the configured one.
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .dns_resolver(Arc::new(resolver));
    if let Some(proxy) = proxy {
        // Credentials in the URL become Proxy-Authorization (basic); no error quotes the URL.
        let p = reqwest::Proxy::all(proxy.url()).map_err(|_| "proxy URL cannot be used")?;
        builder = builder.proxy(p);
    }
    if let Some(pem) = &config.extra_roots_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("webhook.ssl_ca_file: {e}"))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some(identity) = identity {
        // Checked when it was stored (ClientIdentity::from_pem); the error names no key material.
        let id = reqwest::Identity::from_pem(&identity.pem)
            .map_err(|_| "endpoint client certificate: unusable (client_cert, client_key)")?;
        builder = builder.identity(id);
    }
    builder
        .build()
        .map_err(|e| format!("could not build the HTTP client: {e}"))
}

#[cfg(test)]
mod tests {
    //! The built-in (Mozilla, via webpki-roots) roots stay trusted when webhook.ssl_ca_file adds
    //! one: no network needed. A root is "in the store" when a certificate naming it as issuer
    //! gets past the issuer lookup: webpki then checks the signature (which these forged
    //! certificates fail) instead of reporting `UnknownIssuer`.

    use std::net::TcpListener;
    use std::sync::Arc;

    use crate::http::ClientIdentity;

    use super::build_client;
    use crate::http::testutil::config;

    /// (tag, header length, content length) of the DER element at the start of `der`.
    fn tlv(der: &[u8]) -> (u8, usize, usize) {
        let first = der[1];
        if first < 0x80 {
            return (der[0], 2, first as usize);
        }
        let n = (first & 0x7f) as usize;
        let len = der[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (der[0], 2 + n, len)
    }

    fn element(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    /// The elements inside a DER SEQUENCE's content.
    fn children(mut content: &[u8]) -> Vec<&[u8]> {
        let mut out = vec![];
        while !content.is_empty() {
            let (_, h, l) = tlv(content);
            out.push(&content[..h + l]);
            content = &content[h + l..];
        }
        out
    }

    /// `cert` with its issuer replaced by the name whose content is `issuer` (its signature,
    /// made for the old name, no longer verifies under any key).
    fn with_issuer(cert: &[u8], issuer: &[u8]) -> Vec<u8> {
        let (_, h, l) = tlv(cert);
        let parts = children(&cert[h..h + l]);
        let (_, th, tl) = tlv(parts[0]);
        let mut tbs: Vec<Vec<u8>> = children(&parts[0][th..th + tl])
            .into_iter()
            .map(<[u8]>::to_vec)
            .collect();
        // [0] version, serial, signature algorithm, issuer, ...
        assert_eq!(tbs[0][0], 0xa0, "a v3 certificate");
        tbs[3] = element(0x30, issuer);
        let tbs = element(0x30, &tbs.concat());
        element(0x30, &[tbs, parts[1].to_vec(), parts[2].to_vec()].concat())
    }

    /// A TLS server on loopback for one handshake, presenting `cert` (whose key is `key`).
    fn serve_once(cert: Vec<u8>, key: &rcgen::KeyPair) -> u16 {
        serve_once_to(cert, key, None)
    }

    /// The same, requiring a client certificate signed by `client_ca` when one is given.
    fn serve_once_to(cert: Vec<u8>, key: &rcgen::KeyPair, client_ca: Option<Vec<u8>>) -> u16 {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.into()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(
                vec![cert.into()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut tcp, _) = listener.accept().unwrap();
            let mut conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            while conn.is_handshaking() {
                if conn.complete_io(&mut tcp).is_err() {
                    return;
                }
            }
            use std::io::{Read, Write};
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut buf = [0u8; 4096];
            let _ = tls.read(&mut buf);
            let _ = tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        });
        port
    }

    /// What a POST to `https://127.0.0.1:<port>/` through `client` ended in (`Ok` on any answer).
    fn post(
        rt: &tokio::runtime::Runtime,
        client: &reqwest::Client,
        port: u16,
    ) -> Result<u16, String> {
        rt.block_on(async {
            client
                .post(format!("https://127.0.0.1:{port}/"))
                .body("{}")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| format!("{e:?}"))
        })
    }

    #[test]
    fn a_client_certificate_is_presented_when_the_endpoint_has_one() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let server_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = params
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap()
            .der()
            .to_vec();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let client_cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .signed_by(&client_key, &ca, &ca_key)
            .unwrap();
        let identity =
            ClientIdentity::from_pem(&client_cert.pem(), &client_key.serialize_pem()).unwrap();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut cfg = config(true);
        cfg.extra_roots_pem = Some(ca.pem().into_bytes());
        let with = build_client(&cfg, Some(&identity), None, false).unwrap();
        let without = build_client(&cfg, None, None, false).unwrap();
        let ca_der = ca.der().to_vec();
        let port = serve_once_to(leaf.clone(), &server_key, Some(ca_der.clone()));
        assert_eq!(post(&rt, &with, port), Ok(200));
        let port = serve_once_to(leaf, &server_key, Some(ca_der));
        let err = post(&rt, &without, port).unwrap_err();
        assert!(err.to_lowercase().contains("certificate"), "{err}");
    }

    #[test]
    fn mozilla_roots_stay_trusted_beside_an_extra_ca_file() {
        // The extra CA (as webhook.ssl_ca_file would hold it) and a server certificate it signed.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "webhook_ext extra CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap().der().to_vec();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let roots = webpki_roots::TLS_SERVER_ROOTS;
        assert!(roots.len() > 100, "{} built-in roots", roots.len());
        for extra in [None, Some(ca.pem().into_bytes())] {
            let mut cfg = config(true);
            cfg.extra_roots_pem = extra.clone();
            let client = build_client(&cfg, None, None, false).unwrap();
            let with_extra = extra.is_some();

            // The extra CA's certificate is trusted exactly when the file is given.
            let answer = post(&rt, &client, serve_once(leaf.clone(), &key));
            if with_extra {
                assert_eq!(answer, Ok(200), "the extra CA is trusted");
            } else {
                let err = answer.unwrap_err();
                assert!(err.contains("UnknownIssuer"), "no extra CA: {err}");
            }
            // Control: a made-up issuer is unknown, so the probe below can tell.
            let stranger = element(
                0x31,
                &element(
                    0x30,
                    &[
                        element(0x06, &[0x55, 4, 3]),
                        element(0x0c, b"nobody's root"),
                    ]
                    .concat(),
                ),
            );
            let err = post(
                &rt,
                &client,
                serve_once(with_issuer(&leaf, &stranger), &key),
            )
            .unwrap_err();
            assert!(err.contains("UnknownIssuer"), "control: {err}");

            let mut unknown = vec![];
            for anchor in roots {
                let forged = with_issuer(&leaf, &anchor.subject);
                let err = post(&rt, &client, serve_once(forged, &key))
                    .expect_err("a forged certificate is never accepted");
                assert!(err.contains("InvalidCertificate"), "{err}");
                if err.contains("UnknownIssuer") {
                    unknown.push(String::from_utf8_lossy(&anchor.subject).into_owned());
                }
            }
            assert!(
                unknown.is_empty(),
                "with_extra={with_extra}: {} of {} built-in roots not trusted, e.g. {:?}",
                unknown.len(),
                roots.len(),
                unknown.first()
            );
        }
    }
}
