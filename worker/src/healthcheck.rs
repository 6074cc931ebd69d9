//! Push monitoring: after each scheduled backup an HTTP GET to `STORINATOR_HEALTHCHECK_URL`,
//! with `/fail` appended to its path after a failure (the convention of healthchecks.io and
//! Uptime Kuma push monitors). A monitor that stops hearing from us alerts on its own, which
//! covers a dead worker too.

use std::time::Duration;

use anyhow::Context;

/// Time one ping may take; a monitor that is down must not hold up the daemon.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A push monitor.
#[derive(Clone, Debug)]
pub struct Healthcheck {
    ok: reqwest::Url,
    fail: reqwest::Url,
    client: reqwest::Client,
}

impl Healthcheck {
    pub fn new(url: &str) -> anyhow::Result<Healthcheck> {
        let ok = reqwest::Url::parse(url)
            .with_context(|| format!("invalid STORINATOR_HEALTHCHECK_URL {url:?}"))?;
        let mut fail = ok.clone();
        fail.path_segments_mut()
            .map_err(|_| {
                anyhow::anyhow!("invalid STORINATOR_HEALTHCHECK_URL {url:?}: it has no path")
            })?
            .pop_if_empty()
            .push("fail");
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .build()
            .context("building the healthcheck client")?;
        Ok(Healthcheck { ok, fail, client })
    }

    /// The URL pinged for a success or a failure.
    pub fn url(&self, ok: bool) -> &reqwest::Url {
        if ok { &self.ok } else { &self.fail }
    }

    /// Pings the monitor; a failed ping is logged, never an error of the job.
    pub async fn ping(&self, ok: bool) {
        let url = self.url(ok);
        match self.client.get(url.clone()).send().await {
            Ok(r) if r.status().is_success() => tracing::debug!(%url, "healthcheck pinged"),
            Ok(r) => tracing::warn!(%url, status = %r.status(), "healthcheck ping refused"),
            Err(e) => tracing::warn!(%url, "healthcheck ping failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_goes_before_the_query() {
        let h = Healthcheck::new("https://hc.example/ping/abc-123").unwrap();
        assert_eq!(h.url(true).as_str(), "https://hc.example/ping/abc-123");
        assert_eq!(
            h.url(false).as_str(),
            "https://hc.example/ping/abc-123/fail"
        );
        let k = Healthcheck::new("http://kuma.local/api/push/tok/?status=up").unwrap();
        assert_eq!(
            k.url(false).as_str(),
            "http://kuma.local/api/push/tok/fail?status=up"
        );
        assert!(Healthcheck::new("not a url").is_err());
    }
}
