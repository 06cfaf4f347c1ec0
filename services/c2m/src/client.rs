//! The calls people make by hand, without a gRPC client of their own: `c2m handoff` (what an IVR
//! does), `c2m funnel` (what a brand reads), and the account `c2m dev --demo` sets up.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use c2m_proto::v1::{
    self as pb, channel_gateway_service_client::ChannelGatewayServiceClient,
    config_service_client::ConfigServiceClient, handoff_service_client::HandoffServiceClient,
    put_provider_credentials_request::Credentials,
    reporting_service_client::ReportingServiceClient,
};
use c2m_runtime::auth::{Role, TokenKey};
use tonic::{Code, Request, Status, transport::Channel};

/// A failed call, as a person reads it: the RPC, the code, the message, and the fields at fault.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach c2m at {server}: {reason}")]
    Connect { server: String, reason: String },
    #[error("{rpc}: {}", describe(.status))]
    Call { rpc: &'static str, status: Status },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

fn describe(status: &Status) -> String {
    use tonic_types::StatusExt;

    let mut text = format!("{:?}: {}", status.code(), status.message());
    if let Some(bad) = status.get_details_bad_request() {
        for violation in bad.field_violations {
            // Most messages already name every field; a violation is added only where not.
            let named = format!("{}: {}", violation.field, violation.description);
            if !status.message().contains(&named) {
                let _ = write!(text, "; {named}");
            }
        }
    }
    if let Some(wait) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        let _ = write!(text, " (retry after {wait:?})");
    }
    text
}

async fn connect(server: &str) -> Result<Channel, ClientError> {
    let connect_error = |reason: String| ClientError::Connect {
        server: server.to_owned(),
        reason,
    };
    Channel::from_shared(server.to_owned())
        .map_err(|e| connect_error(format!("not a URL: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            // The transport error alone says only "transport error"; its causes say why.
            let mut why = Vec::new();
            let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(&e);
            while let Some(error) = cause {
                let text = error.to_string();
                if why.last() != Some(&text) {
                    why.push(text);
                }
                cause = error.source();
            }
            connect_error(if why.is_empty() {
                e.to_string()
            } else {
                why.join(": ")
            })
        })
}

fn authed<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = format!("Bearer {credential}").parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// `c2m handoff`: deflects one caller, as an IVR does; prints the handoff.
pub struct Deflect<'a> {
    pub server: &'a str,
    pub api_key: &'a str,
    pub account_id: &'a str,
    pub handoff_config_id: &'a str,
    pub consumer_phone: &'a str,
    pub variables: &'a [(String, String)],
    pub idempotency_key: Option<&'a str>,
}

pub async fn handoff(d: Deflect<'_>) -> Result<String, ClientError> {
    let mut client = HandoffServiceClient::new(connect(d.server).await?);
    let idempotency_key = d
        .idempotency_key
        .map_or_else(|| c2m_runtime::ids::generate("cli"), str::to_owned);
    let request = pb::CreateHandoffRequest {
        account_id: d.account_id.to_owned(),
        handoff_config_id: d.handoff_config_id.to_owned(),
        consumer_phone: d.consumer_phone.to_owned(),
        idempotency_key: idempotency_key.clone(),
        template_variables: d.variables.iter().cloned().collect(),
        ..Default::default()
    };
    let handoff = client
        .create_handoff(authed(request, d.api_key))
        .await
        .map_err(|status| ClientError::Call {
            rpc: "CreateHandoff",
            status,
        })?
        .into_inner()
        .handoff
        .unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "handoff     {}", handoff.handoff_id);
    let _ = writeln!(
        out,
        "status      {}",
        enum_name(handoff.status, status_name, "HANDOFF_STATUS_")
    );
    let _ = writeln!(
        out,
        "channel     {}",
        enum_name(handoff.channel, channel_name, "CHANNEL_")
    );
    let _ = writeln!(out, "consumer    {}", handoff.consumer_phone_masked);
    let _ = writeln!(out, "skill       {}", handoff.skill_id);
    let _ = writeln!(
        out,
        "key         {idempotency_key} (send it again to retry this call)"
    );
    if !handoff.duplicate_of.is_empty() {
        let _ = writeln!(out, "same as     {}", handoff.duplicate_of);
    }
    Ok(out)
}

fn status_name(value: i32) -> Option<&'static str> {
    pb::HandoffStatus::try_from(value)
        .ok()
        .map(|s| s.as_str_name())
}

fn channel_name(value: i32) -> Option<&'static str> {
    pb::Channel::try_from(value).ok().map(|c| c.as_str_name())
}

fn stage_name(value: i32) -> Option<&'static str> {
    pb::FunnelStage::try_from(value)
        .ok()
        .map(|s| s.as_str_name())
}

/// An enum's name without its type's prefix (`CHANNEL_SMS` → `SMS`).
fn enum_name(value: i32, name: fn(i32) -> Option<&'static str>, prefix: &str) -> String {
    match name(value) {
        Some(name) => name.strip_prefix(prefix).unwrap_or(name).to_owned(),
        None => value.to_string(),
    }
}

/// How `c2m funnel` groups its rows.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GroupBy {
    None,
    Channel,
    Skill,
    Config,
    IvrNumber,
}

/// `c2m funnel --by`'s buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Bucket {
    Hour,
    Day,
    Week,
}

impl GroupBy {
    fn wire(self) -> pb::FunnelGrouping {
        match self {
            GroupBy::None => pb::FunnelGrouping::Unspecified,
            GroupBy::Channel => pb::FunnelGrouping::Channel,
            GroupBy::Skill => pb::FunnelGrouping::Skill,
            GroupBy::Config => pb::FunnelGrouping::HandoffConfig,
            GroupBy::IvrNumber => pb::FunnelGrouping::IvrNumber,
        }
    }
}

/// `c2m funnel --by`: a line per bucket (and group) of the last `hours`, with the main stages,
/// the deflection rate and the median time to reply.
pub async fn funnel_series(
    server: &str,
    token: &str,
    account_id: &str,
    group_by: GroupBy,
    hours: u32,
    (bucket, time_zone): (Bucket, &str),
) -> Result<String, ClientError> {
    let mut client = ReportingServiceClient::new(connect(server).await?);
    let end = chrono::Utc::now();
    let start = end - chrono::Duration::hours(i64::from(hours));
    let request = pb::GetFunnelSeriesRequest {
        account_id: account_id.to_owned(),
        start_time: Some(c2m_proto::timestamp(start)),
        end_time: Some(c2m_proto::timestamp(end)),
        bucket: match bucket {
            Bucket::Hour => pb::FunnelBucket::Hour,
            Bucket::Day => pb::FunnelBucket::Day,
            Bucket::Week => pb::FunnelBucket::Week,
        } as i32,
        time_zone: time_zone.to_owned(),
        group_by: match group_by {
            GroupBy::None => Vec::new(),
            g => vec![g.wire() as i32],
        },
        repeat_window_hours: 0,
    };
    let answer = client
        .get_funnel_series(authed(request, token))
        .await
        .map_err(|status| ClientError::Call {
            rpc: "GetFunnelSeries",
            status,
        })?
        .into_inner();
    Ok(series_table(&answer, hours))
}

/// A line per row: bucket, group, the main stages, deflection rate, median time to reply, and
/// the callers deflected again within a day.
fn series_table(answer: &pb::GetFunnelSeriesResponse, hours: u32) -> String {
    if answer.rows.is_empty() {
        return format!("no handoffs in the last {hours} hours\n");
    }
    let stages = [
        ("attempted", pb::FunnelStage::Attempted),
        ("sent", pb::FunnelStage::Sent),
        ("delivered", pb::FunnelStage::Delivered),
        ("read", pb::FunnelStage::Read),
        ("responded", pb::FunnelStage::Responded),
        ("failed", pb::FunnelStage::Failed),
    ];
    let group_width = answer
        .rows
        .iter()
        .map(|r| r.groups.join(",").len())
        .max()
        .unwrap_or(0)
        .max("group".len());
    let bucket_width = answer
        .rows
        .iter()
        .map(|r| r.bucket_label.len())
        .max()
        .unwrap_or(0)
        .max(answer.time_zone.len());
    let mut out = format!(
        "{:bucket_width$}  {:group_width$}",
        answer.time_zone, "group"
    );
    for (name, _) in stages {
        let _ = write!(out, "  {name:>9}");
    }
    out.push_str("  deflection  reply p50    repeats\n");
    for row in &answer.rows {
        let _ = write!(
            out,
            "{:bucket_width$}  {:group_width$}",
            row.bucket_label,
            row.groups.join(",")
        );
        for (_, stage) in stages {
            let count = row
                .counts
                .iter()
                .find(|c| c.stage == stage as i32)
                .map_or(0, |c| c.count);
            let _ = write!(out, "  {count:>9}");
        }
        let reply = row.time_to_reply.filter(|t| t.count > 0).map_or_else(
            || "-".to_owned(),
            |t| format!("{:.1}s", t.p50_ms as f64 / 1000.0),
        );
        let _ = writeln!(out, "  {:>9.1}%  {reply:>9}", row.deflection_rate * 100.0);
    }
    out
}

/// `c2m funnel`: the account's funnel over the last `hours`, one column per group, stages in
/// the funnel's order.
pub async fn funnel(
    server: &str,
    token: &str,
    account_id: &str,
    group_by: GroupBy,
    hours: u32,
) -> Result<String, ClientError> {
    let mut client = ReportingServiceClient::new(connect(server).await?);
    let end = chrono::Utc::now();
    let start = end - chrono::Duration::hours(i64::from(hours));
    let group_by = group_by.wire();
    let request = pb::GetFunnelRequest {
        account_id: account_id.to_owned(),
        start_time: Some(c2m_proto::timestamp(start)),
        end_time: Some(c2m_proto::timestamp(end)),
        group_by: group_by as i32,
    };
    let rows = client
        .get_funnel(authed(request, token))
        .await
        .map_err(|status| ClientError::Call {
            rpc: "GetFunnel",
            status,
        })?
        .into_inner()
        .rows;
    Ok(funnel_table(&rows, hours))
}

const STAGE: &str = "FUNNEL_STAGE_";

/// One of a funnel row's rates.
type Rate = fn(&pb::FunnelRow) -> f64;

/// The rows as a table: a line per stage (in the funnel's order), a column per group.
fn funnel_table(rows: &[pb::FunnelRow], hours: u32) -> String {
    if rows.is_empty() {
        return format!("nothing counted in the last {hours} hours\n");
    }
    let groups: Vec<String> = rows
        .iter()
        .map(|r| {
            if r.group.is_empty() {
                "count".to_owned()
            } else {
                r.group.clone()
            }
        })
        .collect();
    let mut stages: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        for count in &row.counts {
            stages
                .entry(count.stage)
                .or_insert_with(|| vec![0; rows.len()])[i] = count.count;
        }
    }
    let width = stages
        .keys()
        .map(|s| enum_name(*s, stage_name, STAGE).len())
        .max()
        .unwrap_or(0)
        .max("deflection rate".len());
    let columns: Vec<usize> = groups.iter().map(|g| g.len().max(8)).collect();
    let mut out = format!("{:width$}", "stage");
    for (group, column) in groups.iter().zip(&columns) {
        let _ = write!(out, "  {group:>column$}");
    }
    out.push('\n');
    for (stage, counts) in &stages {
        let _ = write!(out, "{:width$}", enum_name(*stage, stage_name, STAGE));
        for (count, column) in counts.iter().zip(&columns) {
            let _ = write!(out, "  {count:>column$}");
        }
        out.push('\n');
    }
    let rates: [(&str, Rate); 4] = [
        ("delivery rate", |r| r.delivery_rate),
        ("read rate", |r| r.read_rate),
        ("response rate", |r| r.response_rate),
        ("deflection rate", |r| r.deflection_rate),
    ];
    for (name, rate) in rates {
        let _ = write!(out, "{name:width$}");
        for (row, column) in rows.iter().zip(&columns) {
            let percent = format!("{:.1}%", rate(row) * 100.0);
            let _ = write!(out, "  {percent:>column$}");
        }
        out.push('\n');
    }
    out
}

/// How `c2m report export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// A header, then a line per handoff with a column per stage's time.
    Csv,
    /// A JSON object per line: the Transaction as the API's JSON mapping has it.
    Jsonl,
}

/// What to export.
#[derive(Debug)]
pub struct Export<'a> {
    pub server: &'a str,
    pub token: &'a str,
    pub account_id: &'a str,
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    pub format: ExportFormat,
}

/// `c2m report export`: streams the handoffs to `output` (stdout when `None`), a batch at a
/// time, counting on stderr when it is a terminal. Answers what to print on stdout afterwards.
pub async fn export(
    e: Export<'_>,
    output: Option<&std::path::Path>,
) -> Result<String, ClientError> {
    use std::io::{IsTerminal, Write};

    let mut client = ReportingServiceClient::new(connect(e.server).await?);
    let request = pb::ExportTransactionsRequest {
        account_id: e.account_id.to_owned(),
        start_time: e.from.map(c2m_proto::timestamp),
        end_time: e.to.map(c2m_proto::timestamp),
    };
    let call_error = |status| ClientError::Call {
        rpc: "ExportTransactions",
        status,
    };
    let mut stream = client
        .export_transactions(authed(request, e.token))
        .await
        .map_err(call_error)?
        .into_inner();
    let path = output.map_or_else(|| "stdout".to_owned(), |p| p.display().to_string());
    let write_error = |source| ClientError::Write {
        path: path.clone(),
        source,
    };
    let mut out: Box<dyn Write> = match output {
        Some(file) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(file).map_err(write_error)?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    if e.format == ExportFormat::Csv {
        out.write_all(c2m_proto::csv::header().as_bytes())
            .map_err(write_error)?;
    }
    let progress = std::io::stderr().is_terminal();
    let mut written = 0u64;
    while let Some(batch) = stream.message().await.map_err(call_error)? {
        for t in &batch.transactions {
            let line = match e.format {
                ExportFormat::Csv => c2m_proto::csv::line(t),
                ExportFormat::Jsonl => {
                    let mut line = c2m_proto::to_json("c2m.v1.Transaction", t).to_string();
                    line.push('\n');
                    line
                }
            };
            out.write_all(line.as_bytes()).map_err(write_error)?;
        }
        written += batch.transactions.len() as u64;
        if progress {
            eprint!("\rexported {written} handoffs");
        }
    }
    out.flush().map_err(write_error)?;
    if progress {
        eprintln!();
    }
    Ok(match output {
        Some(_) => format!("exported {written} handoffs to {path}\n"),
        None => String::new(),
    })
}

/// What `c2m dev --demo` set up, and the commands that use it.
#[derive(Debug)]
pub struct Demo {
    pub api_key: String,
    pub admin_token: String,
}

/// The demo account: `demo`, deflection on, its SMS through the sandbox (which answers "Yes
/// please"), a configuration `billing`, and a new IVR key. What exists already is kept, so a
/// restarted `c2m dev --demo` (same database) only adds a key.
pub async fn set_up_demo(server: &str, key: &TokenKey) -> Result<Demo, ClientError> {
    const ACCOUNT: &str = "demo";
    let channel = connect(server).await?;
    let hours = Duration::from_secs(12 * 3600);
    let operator = key.user_token("c2m-demo", Role::Operator, None, hours);
    let admin = key.user_token("c2m-demo", Role::Admin, Some(ACCOUNT), hours);
    let mut config = ConfigServiceClient::new(channel.clone());
    let account = pb::CreateAccountRequest {
        account_id: ACCOUNT.to_owned(),
        display_name: "Demo Inc.".to_owned(),
        settings: Some(pb::AccountSettings {
            deflection_enabled: true,
            ..Default::default()
        }),
    };
    existing_is_fine(
        "CreateAccount",
        config.create_account(authed(account, &operator)).await,
    )?;
    let handoff_config = pb::CreateHandoffConfigRequest {
        account_id: ACCOUNT.to_owned(),
        config: Some(pb::HandoffConfig {
            handoff_config_id: "billing".to_owned(),
            name: "Billing queue".to_owned(),
            skill_id: "billing-agents".to_owned(),
            channel_priority: vec![pb::Channel::Sms as i32],
            messages: vec![pb::ChannelMessage {
                channel: pb::Channel::Sms as i32,
                text: "Thanks for waiting. Text us here about {{topic}} and an agent will answer."
                    .to_owned(),
            }],
            ..Default::default()
        }),
    };
    existing_is_fine(
        "CreateHandoffConfig",
        config
            .create_handoff_config(authed(handoff_config, &admin))
            .await,
    )?;
    let sandbox = pb::PutProviderCredentialsRequest {
        account_id: ACCOUNT.to_owned(),
        provider: pb::Provider::Sandbox as i32,
        credentials: Some(Credentials::Sandbox(pb::SandboxCredentials {
            reply_text: "Yes please".to_owned(),
            fail_delivery: false,
        })),
    };
    ChannelGatewayServiceClient::new(channel)
        .put_provider_credentials(authed(sandbox, &admin))
        .await
        .map_err(|status| ClientError::Call {
            rpc: "PutProviderCredentials",
            status,
        })?;
    let api_key = config
        .create_api_key(authed(
            pb::CreateApiKeyRequest {
                account_id: ACCOUNT.to_owned(),
                name: "demo-ivr".to_owned(),
                scopes: Vec::new(),
            },
            &admin,
        ))
        .await
        .map_err(|status| ClientError::Call {
            rpc: "CreateApiKey",
            status,
        })?
        .into_inner()
        .plaintext;
    Ok(Demo {
        api_key,
        admin_token: admin,
    })
}

fn existing_is_fine<T>(
    rpc: &'static str,
    answer: Result<tonic::Response<T>, Status>,
) -> Result<(), ClientError> {
    match answer {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::AlreadyExists => Ok(()),
        Err(status) => Err(ClientError::Call { rpc, status }),
    }
}

impl Demo {
    /// What to paste into another shell, for `server`.
    pub fn instructions(&self, server: &str) -> String {
        let at = if server == "http://127.0.0.1:50051" {
            String::new()
        } else {
            format!(" --server {server}")
        };
        format!(
            "\nc2m dev --demo: account `demo` is set up (SMS through the sandbox, which answers \"Yes please\").\n\
             In another shell:\n\n  \
             # an IVR deflects a caller\n  \
             cargo run -q --release -- handoff{at} --key {key} --account demo --handoff-config billing --phone +14155550123 --var topic=\"your bill\"\n\n  \
             # the brand's funnel (attempted, sent, delivered, responded, ...)\n  \
             cargo run -q --release -- funnel{at} --token {token} --account demo --group-by channel\n\n\
             Or in a browser: {server}/console, signed in with the token above (the demo's admin).\n\n\
             The key holds until it is revoked; the token for 12 hours, while the token secret\n\
             stays the same (a configured one, or the data directory's).\n",
            key = self.api_key,
            token = self.admin_token,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_funnel_reads_down_in_its_order_and_across_by_group() {
        let count = |stage: pb::FunnelStage, count| pb::StageCount {
            stage: stage as i32,
            count,
        };
        let rows = [
            pb::FunnelRow {
                group: "CHANNEL_SMS".into(),
                counts: vec![
                    count(pb::FunnelStage::Attempted, 3),
                    count(pb::FunnelStage::Sent, 2),
                ],
                ..Default::default()
            },
            pb::FunnelRow {
                group: "CHANNEL_WHATSAPP".into(),
                counts: vec![count(pb::FunnelStage::Sent, 1)],
                ..Default::default()
            },
        ];
        let rows = rows.map(|row| pb::FunnelRow {
            delivery_rate: 0.5,
            ..row
        });
        assert_eq!(
            funnel_table(&rows, 24),
            "stage            CHANNEL_SMS  CHANNEL_WHATSAPP\n\
             ATTEMPTED                  3                 0\n\
             SENT                       2                 1\n\
             delivery rate          50.0%             50.0%\n\
             read rate               0.0%              0.0%\n\
             response rate           0.0%              0.0%\n\
             deflection rate         0.0%              0.0%\n"
        );
        assert_eq!(
            funnel_table(&[], 24),
            "nothing counted in the last 24 hours\n"
        );
    }
}
