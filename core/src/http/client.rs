//! The reqwest client every attempt goes through: HTTP/1.1 only, no redirects, no proxy, the
//! guarded resolver for every host name, and the extra trusted roots.

use std::sync::Arc;
use std::time::Duration;

use super::resolver::GuardedResolver;
use super::HttpConfig;

pub(super) fn build_client(config: &HttpConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .user_agent(config.user_agent.clone())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .dns_resolver(Arc::new(GuardedResolver::new(
            config.policy.clone(),
            &config.dns_servers,
        )));
    if let Some(pem) = &config.extra_roots_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("webhook.ssl_ca_file: {e}"))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| format!("could not build the HTTP client: {e}"))
}
