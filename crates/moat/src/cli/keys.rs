//! `moat keys …`: API keys on a moat server (an admin key's commands).

use std::process::ExitCode;

use super::output;

use moat_client::types::{ApiKey, CreateKey, KeyQuotas, KeyRole, QuotaRequest};
use moat_proto::units::{format_size as fmt_bytes, parse_size};

use super::remote::{self, Format, Remote};
use super::table::{self, Table};

/// Arguments of `moat keys`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Make an API key and print it with its secret (shown only this once).
    Create(CreateArgs),
    /// List a tenant's keys, revoked ones included.
    #[command(visible_alias = "list")]
    Ls {
        /// The tenant [default: the caller's].
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke keys: they authenticate nothing from now on.
    Revoke {
        /// Their ids (`key_…`).
        #[arg(required = true)]
        ids: Vec<String>,
        /// Their tenant [default: the caller's].
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// A label for people.
    name: String,
    /// What the key may do.
    #[arg(long, value_enum, default_value_t = Role::User)]
    role: Role,
    /// The tenant it acts for, created if new [default: the caller's].
    #[arg(long)]
    tenant: Option<String>,
    /// Most sandboxes it may have at once.
    #[arg(long)]
    max_sandboxes: Option<u32>,
    /// Most memory its sandboxes may have together, e.g. 4G.
    #[arg(long)]
    max_memory: Option<String>,
    /// Most processes and threads its sandboxes may have together (the sum of their pids
    /// limits).
    #[arg(long)]
    max_pids: Option<u64>,
    /// Most bytes of snapshots its tenant may keep when it makes one, e.g. 10G [default: the
    /// server's].
    #[arg(long)]
    max_snapshot_size: Option<String>,
    /// Most API requests per minute [default: the server's --rate-limit].
    #[arg(long)]
    requests_per_minute: Option<u32>,
    /// Print only the secret.
    #[arg(long, short = 'q')]
    quiet: bool,
}

/// `--role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    /// Uses its tenant's templates and sandboxes.
    User,
    /// Also manages keys.
    Admin,
}

/// Runs `moat keys …`.
pub fn main(args: KeysArgs) -> ExitCode {
    let KeysArgs { remote, command } = args;
    remote::block_on(async move {
        let client = remote.client()?;
        let format = remote.output;
        match command {
            KeysCommand::Create(a) => {
                if let Some(m) = &a.max_memory {
                    parse_size(m).map_err(|e| anyhow::anyhow!("--max-memory: {e}"))?;
                }
                if let Some(m) = &a.max_snapshot_size {
                    parse_size(m).map_err(|e| anyhow::anyhow!("--max-snapshot-size: {e}"))?;
                }
                let quotas = QuotaRequest {
                    max_sandboxes: a.max_sandboxes,
                    max_memory: a.max_memory.clone(),
                    max_pids: a.max_pids,
                    max_snapshot_size: a.max_snapshot_size.clone(),
                    requests_per_minute: a.requests_per_minute,
                };
                let req = CreateKey {
                    name: a.name.clone(),
                    role: match a.role {
                        Role::User => KeyRole::User,
                        Role::Admin => KeyRole::Admin,
                    },
                    tenant: a.tenant.clone(),
                    quotas: (quotas != QuotaRequest::default()).then_some(quotas),
                };
                let created = client.create_key(&req).await?;
                match format {
                    Format::Json => remote::print_json(&created)?,
                    Format::Table if a.quiet => output::println(created.secret)?,
                    Format::Table => {
                        let k = &created.key;
                        output::print(table::fields(&[
                            ("id", k.id.clone()),
                            ("tenant", k.tenant.clone()),
                            ("name", k.name.clone()),
                            ("role", k.role.to_string()),
                            ("quotas", quotas_text(&k.quotas)),
                            ("secret", created.secret.clone()),
                        ]))?;
                        eprintln!("moat: keep the secret now: the server cannot show it again");
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            KeysCommand::Ls { tenant } => {
                let keys = client.list_keys(tenant.as_deref()).await?;
                match format {
                    Format::Json => remote::print_json(&keys)?,
                    Format::Table => output::print(key_table(&keys))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            KeysCommand::Revoke { ids, tenant } => {
                let mut failed = false;
                let mut revoked = Vec::new();
                for id in &ids {
                    match client.revoke_key(id, tenant.as_deref()).await {
                        Ok(key) => revoked.push(key),
                        Err(e) => {
                            failed = true;
                            remote::report(
                                &anyhow::Error::new(e).context(format!("revoking {id}")),
                            );
                        }
                    }
                }
                match format {
                    Format::Json => remote::print_json(&revoked)?,
                    Format::Table => {
                        for k in &revoked {
                            output::println(&k.id)?;
                        }
                    }
                }
                Ok(if failed {
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                })
            }
        }
    })
}

/// Quotas as `sandboxes=N,memory=SIZE,pids=N,snapshots=SIZE,rpm=N` (`-` when none).
fn quotas_text(q: &KeyQuotas) -> String {
    let mut parts = Vec::new();
    if let Some(n) = q.max_sandboxes {
        parts.push(format!("sandboxes={n}"));
    }
    if let Some(m) = q.max_memory_bytes {
        parts.push(format!("memory={}", fmt_bytes(m)));
    }
    if let Some(p) = q.max_pids {
        parts.push(format!("pids={p}"));
    }
    if let Some(s) = q.max_snapshot_bytes {
        parts.push(format!("snapshots={}", fmt_bytes(s)));
    }
    if let Some(r) = q.requests_per_minute {
        parts.push(format!("rpm={r}"));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// Keys as a table for people.
pub fn key_table(keys: &[ApiKey]) -> String {
    let mut t = Table::new(&[
        "ID", "NAME", "TENANT", "ROLE", "CREATED", "REVOKED", "QUOTAS",
    ]);
    for k in keys {
        t.row(vec![
            k.id.clone(),
            k.name.clone(),
            k.tenant.clone(),
            k.role.to_string(),
            table::time(k.created_at),
            table::opt_time(k.revoked_at),
            quotas_text(&k.quotas),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_tables() {
        let key = |id: &str, revoked_at, quotas| ApiKey {
            id: id.into(),
            tenant: "default".into(),
            name: "ci runner".into(),
            role: KeyRole::User,
            created_at: 0,
            revoked_at,
            quotas,
        };
        let text = key_table(&[
            key("key_a", None, KeyQuotas::default()),
            key(
                "key_b",
                Some(1000),
                KeyQuotas {
                    max_sandboxes: Some(2),
                    max_memory_bytes: Some(4 << 30),
                    max_pids: Some(1024),
                    max_snapshot_bytes: None,
                    requests_per_minute: None,
                },
            ),
        ]);
        assert_eq!(
            text,
            "ID     NAME       TENANT   ROLE  CREATED              REVOKED              QUOTAS\n\
             key_a  ci runner  default  user  1970-01-01 00:00:00  -                    -\n\
             key_b  ci runner  default  user  1970-01-01 00:00:00  1970-01-01 00:00:01  sandboxes=2,memory=4G,pids=1024\n"
        );
    }
}
