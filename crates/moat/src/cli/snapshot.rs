//! `moat snapshot …`: snapshots on a moat server.

use std::process::ExitCode;

use super::output;

use anyhow::Result;
use moat_client::Client;
use moat_client::types::{CreateSnapshot, ListSnapshots, Snapshot};
use moat_proto::units::format_size as fmt_bytes;

use super::remote::{self, Format, Remote};
use super::table::{self, Table};

/// Arguments of `moat snapshot`.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    remote: Remote,
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SnapshotCommand {
    /// Snapshot a sandbox's files (running or paused) and print the snapshot's id; start
    /// sandboxes from it with `moat sandbox create --snapshot ID`.
    Create {
        /// The sandbox's id.
        sandbox: String,
        /// A name for people (need not be unique).
        #[arg(long)]
        name: Option<String>,
        /// Save its memory and running processes too (gvisor sandboxes): sandboxes made from
        /// it go on from where they were.
        #[arg(long)]
        memory: bool,
    },
    /// List snapshots, oldest first.
    #[command(visible_alias = "list")]
    Ls {
        /// Only snapshots of this sandbox.
        #[arg(long, value_name = "ID")]
        sandbox: Option<String>,
        /// Only snapshots with this name.
        #[arg(long)]
        name: Option<String>,
        /// Show at most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one snapshot.
    #[command(visible_alias = "show")]
    Get {
        /// Its id.
        id: String,
    },
    /// Delete snapshots (sandboxes made from them keep running).
    #[command(visible_alias = "delete")]
    Rm {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Runs `moat snapshot …`.
pub fn main(args: SnapshotArgs) -> ExitCode {
    let SnapshotArgs { remote, command } = args;
    remote::block_on(async move {
        let client = remote.client()?;
        let format = remote.output;
        match command {
            SnapshotCommand::Create {
                sandbox,
                name,
                memory,
            } => {
                let snapshot = client
                    .create_snapshot(&sandbox, &CreateSnapshot { name, memory })
                    .await?;
                match format {
                    Format::Json => remote::print_json(&snapshot)?,
                    Format::Table => output::println(snapshot.id)?,
                }
                Ok(ExitCode::SUCCESS)
            }
            SnapshotCommand::Ls {
                sandbox,
                name,
                limit,
            } => {
                let filter = ListSnapshots {
                    sandbox_id: sandbox,
                    name,
                    after: None,
                    limit: limit.map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
                };
                let mut snapshots = match limit {
                    Some(_) => client.list_snapshots(&filter).await?.snapshots,
                    None => client.list_all_snapshots(&filter).await?,
                };
                if let Some(limit) = limit {
                    snapshots.truncate(limit);
                }
                match format {
                    Format::Json => remote::print_json(&snapshots)?,
                    Format::Table => output::print(snapshot_table(&snapshots))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            SnapshotCommand::Get { id } => {
                let snapshot = client.get_snapshot(&id).await?;
                match format {
                    Format::Json => remote::print_json(&snapshot)?,
                    Format::Table => output::print(describe(&snapshot))?,
                }
                Ok(ExitCode::SUCCESS)
            }
            SnapshotCommand::Rm { ids } => rm(&client, &ids).await,
        }
    })
}

async fn rm(client: &Client, ids: &[String]) -> Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match client.delete_snapshot(id).await {
            Ok(()) => output::println(id)?,
            Err(e) => {
                failed = true;
                remote::report(&anyhow::Error::new(e).context(format!("deleting {id}")));
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Snapshots as a table for people.
fn snapshot_table(snapshots: &[Snapshot]) -> String {
    let mut t = Table::new(&["ID", "NAME", "SANDBOX", "TEMPLATE", "SIZE", "CREATED"]);
    for s in snapshots {
        t.row(vec![
            s.id.clone(),
            s.name.clone().unwrap_or_else(|| "-".into()),
            s.sandbox_id.clone(),
            s.template.clone(),
            fmt_bytes(s.size_bytes),
            table::time(s.created_at),
        ]);
    }
    t.render()
}

/// One snapshot as `field: value` lines.
fn describe(s: &Snapshot) -> String {
    let r = &s.resources;
    table::fields(&[
        ("id", s.id.clone()),
        ("name", s.name.clone().unwrap_or_else(|| "-".into())),
        ("sandbox", s.sandbox_id.clone()),
        ("template", s.template.clone()),
        ("size", fmt_bytes(s.size_bytes)),
        (
            "contents",
            if s.memory {
                "files and memory".into()
            } else {
                "files".into()
            },
        ),
        ("memory", fmt_bytes(r.memory_bytes)),
        ("cpus", table::cpus(r.cpu_millis)),
        ("pids", r.pids.to_string()),
        ("disk", fmt_bytes(r.disk_bytes)),
        ("created", table::time(s.created_at)),
    ])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use moat_client::types::ResourceLimits;

    use super::*;

    #[test]
    fn snapshot_tables() {
        let s = Snapshot {
            id: "aaaa".into(),
            name: Some("first".into()),
            sandbox_id: "bbbb".into(),
            template: "host".into(),
            resources: ResourceLimits {
                memory_bytes: 512 << 20,
                cpu_millis: 1000,
                pids: 64,
                disk_bytes: 1 << 30,
            },
            size_bytes: 10 << 10,
            memory: false,
            created_at: 0,
        };
        let text = snapshot_table(std::slice::from_ref(&s));
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("ID    NAME   SANDBOX  TEMPLATE  SIZE"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("aaaa  first  bbbb     host      10K"),
            "{text}"
        );
        let one = describe(&s);
        assert!(one.contains("contents:  files\n"), "{one}");
    }
}
