//! Completion webhooks: when a job with a `webhook_url` ends, the server POSTs the job's JSON
//! there, signed, and retries with backoff until it answers 2xx.
//!
//! - **Durable:** the delivery is armed in the transaction that ends the job, so a restart
//!   neither loses nor repeats one that was answered; one cut off mid-flight is sent again
//!   (at least once: `Moat-Delivery`, the job's id, lets a receiver drop a repeat).
//! - **Signed:** `Moat-Signature: t=T,v1=HEX`, HEX the hex HMAC-SHA256 of `T.BODY` under the
//!   job's secret (derived from the server's key and the job's id, shown to its owner).
//! - **Not a way into the host's network:** the URL's host is resolved by the server and every
//!   address must be public (not loopback, private, link-local, the metadata address, the
//!   host's own …) unless the operator allows private targets; the connection goes to the
//!   address checked (no second lookup to rebind), redirects are not followed, and each
//!   delivery is bounded in time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;

use super::{Jobs, lock};
use crate::manager::{ManagerError, ManagerResult, SandboxManager};
use crate::store::{WebhookRecord, now_ms};

/// Longest webhook URL.
pub const MAX_WEBHOOK_URL: usize = 2048;
/// Deliveries of one webhook, at most; then it is given up (`last_error` says why).
pub const MAX_WEBHOOK_DELIVERIES: u32 = 8;
/// Longest one delivery may take, connection included.
pub const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries under way at once on the server.
const CONCURRENT_DELIVERIES: usize = 4;
/// How often due deliveries are looked for when nothing wakes the loop.
const POLL: Duration = Duration::from_millis(500);

/// Checks a webhook URL's form: `http` or `https`, a host, no credentials, not too long;
/// an address given literally must be one webhooks may go to.
pub(super) fn check_url(url: &str, private_ok: bool) -> ManagerResult<()> {
    let bad = |why: &str| ManagerError::Invalid(format!("webhook_url {url:?}: {why}"));
    if url.len() > MAX_WEBHOOK_URL {
        return Err(bad(&format!("longer than {MAX_WEBHOOK_URL} bytes")));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("only http:// and https:// URLs"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("credentials do not go in the URL"));
    }
    let Some(host) = parsed.host_str() else {
        return Err(bad("no host"));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let literal = if host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
    } else {
        host.parse::<IpAddr>().ok()
    };
    if let Some(ip) = literal
        && let Err(why) = allowed(ip, private_ok)
    {
        return Err(bad(&why));
    }
    Ok(())
}

/// Whether a webhook may go to `ip`.
fn allowed(ip: IpAddr, private_ok: bool) -> Result<(), String> {
    if crate::network::policy::operator_closed(ip) {
        return Err(format!(
            "{ip} is {}",
            crate::network::policy::OPERATOR_CLOSED
        ));
    }
    if private_ok {
        return Ok(());
    }
    match crate::network::policy::special_range(ip, &crate::network::host_addresses()) {
        Some(range) => Err(format!(
            "{ip} is {}; this server sends webhooks to public addresses only",
            range.what
        )),
        None => Ok(()),
    }
}

/// The secret of job `id`'s webhook signatures.
pub(super) fn secret(access_key: &[u8], id: &str) -> String {
    crate::manager::access::derive_labelled(access_key, b"moat-job-webhook\0", id)
}

/// The `Moat-Signature` of `body` sent at Unix second `t`.
pub fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    // HMAC takes keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts every key length"));
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

/// Resolves `url`'s host to an address webhooks may go to.
async fn target(url: &reqwest::Url, private_ok: bool) -> Result<SocketAddr, String> {
    let host = url.host_str().ok_or("no host")?;
    let port = url.port_or_known_default().ok_or("no port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| format!("{host} has no address"))?;
    // Every address it has must pass: a name that also points inside is refused.
    for a in &addrs {
        allowed(a.ip(), private_ok)?;
    }
    Ok(first)
}

/// One delivery of `body` to `rec.url`.
async fn deliver(
    rec: &WebhookRecord,
    secret: &str,
    body: &[u8],
    private_ok: bool,
) -> Result<(), String> {
    let url = reqwest::Url::parse(&rec.url).map_err(|e| e.to_string())?;
    let addr = target(&url, private_ok).await?;
    crate::tls::install_provider();
    let host = url.host_str().unwrap_or_default().to_owned();
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(WEBHOOK_TIMEOUT)
        .resolve(&host, addr)
        .build()
        .map_err(|e| format!("webhook client: {e}"))?;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let resp = client
        .post(url)
        .header("Content-Type", "application/json")
        .header("User-Agent", concat!("moat/", env!("CARGO_PKG_VERSION")))
        .header("Moat-Event", "job.finished")
        .header("Moat-Delivery", &rec.job_id)
        .header("Moat-Signature", signature(secret, t, body))
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| format!("{e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("answered {}", resp.status()))
    }
}

impl SandboxManager {
    /// Sends due webhooks until `stop` turns true, [`CONCURRENT_DELIVERIES`] at a time.
    pub(super) async fn run_webhooks(
        &self,
        jobs: std::sync::Arc<Jobs>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            while tasks.try_join_next().is_some() {}
            let room = CONCURRENT_DELIVERIES.saturating_sub(tasks.len());
            let now = now_ms();
            let due = if room == 0 {
                Vec::new()
            } else {
                let limit = u32::try_from(room).unwrap_or(1);
                self.inner
                    .db(move |s| s.due_webhooks(now, limit))
                    .await
                    .unwrap_or_default()
            };
            for rec in due {
                if !lock(&jobs.delivering).insert(rec.job_id.clone()) {
                    continue;
                }
                let manager = self.clone();
                let jobs = jobs.clone();
                tasks.spawn(async move {
                    manager.deliver_one(&jobs, rec.clone()).await;
                    lock(&jobs.delivering).remove(&rec.job_id);
                    jobs.webhooks.notify_one();
                });
            }
            tokio::select! {
                () = jobs.webhooks.notified() => {}
                () = tokio::time::sleep(POLL) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    async fn deliver_one(&self, jobs: &Jobs, rec: WebhookRecord) {
        // The listing that found it due may predate a delivery that ended since (and left
        // `delivering` just before this one entered): read again, now that it is entered.
        let (i, tries, now) = (rec.job_id.clone(), rec.attempts, now_ms());
        let due = self
            .inner
            .db(move |s| s.webhook_still_due(&i, tries, now))
            .await;
        if !due.unwrap_or(false) {
            return;
        }
        let (t, i) = (rec.tenant.clone(), rec.job_id.clone());
        let job = match self.inner.db(move |s| s.get_job(&t, &i)).await {
            Ok(job) => job,
            // Deleted meanwhile: its row went with it.
            Err(_) => return,
        };
        let mut shown = super::to_v1(&job);
        shown.webhook = None;
        let body = serde_json::to_vec(&shown).unwrap_or_default();
        let secret = secret(&self.inner.access_key, &rec.job_id);
        let result = deliver(&rec, &secret, &body, jobs.opts.webhooks_to_private).await;
        let (error, retry_at) = match result {
            Ok(()) => (None, None),
            Err(e) => {
                let tries = rec.attempts + 1;
                let retry =
                    (tries < MAX_WEBHOOK_DELIVERIES).then(|| now_ms() + (1000i64 << tries.min(8)));
                tracing::info!(job = %rec.job_id, tries, "webhook delivery failed: {e}");
                (Some(e), retry)
            }
        };
        let id = rec.job_id.clone();
        if let Err(e) = self
            .inner
            .db(move |s| s.webhook_tried(&id, error.as_deref(), retry_at))
            .await
        {
            tracing::warn!(job = %rec.job_id, "recording a webhook delivery: {e}");
        }
    }
}
