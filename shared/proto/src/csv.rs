//! Transactions as CSV, for people who live in spreadsheets: `c2m report export` and the
//! console's download write the same columns.

use std::fmt::Write as _;

use crate::v1::{Channel, FunnelStage, Transaction};

/// The stages after ATTEMPTED, each a column of the time it was first reached.
fn stages() -> impl Iterator<Item = FunnelStage> {
    (FunnelStage::Sent as i32..).map_while(|n| FunnelStage::try_from(n).ok())
}

/// `text` as one CSV field, quoted when it must be.
pub fn field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn rfc3339(at: Option<&prost_types::Timestamp>) -> String {
    at.and_then(crate::from_timestamp)
        .map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

/// The header line: the handoff's fields, then `<stage>_at` for each stage after ATTEMPTED.
pub fn header() -> String {
    let mut line = "handoff_id,attempted_at,handoff_config_id,ivr_number,channel,skill_id,\
        conversation_id,error_code,source"
        .to_owned();
    for stage in stages() {
        let name = stage
            .as_str_name()
            .trim_start_matches("FUNNEL_STAGE_")
            .to_ascii_lowercase();
        let _ = write!(line, ",{name}_at");
    }
    line.push('\n');
    line
}

/// One handoff's line, under [`header`].
pub fn line(t: &Transaction) -> String {
    let channel = Channel::try_from(t.channel)
        .ok()
        .filter(|c| *c != Channel::Unspecified)
        .map_or("", |c| c.as_str_name().trim_start_matches("CHANNEL_"));
    let mut fields = vec![
        field(&t.handoff_id),
        rfc3339(t.attempted_at.as_ref()),
        field(&t.handoff_config_id),
        field(&t.ivr_number),
        channel.to_owned(),
        field(&t.skill_id),
        field(&t.conversation_id),
        field(&t.error_code),
        field(&t.source),
    ];
    for stage in stages() {
        let first = t.stages.iter().find(|s| s.stage == stage as i32);
        fields.push(first.map_or_else(String::new, |s| rfc3339(s.at.as_ref())));
    }
    let mut line = fields.join(",");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::StageTime;

    #[test]
    fn a_line_has_a_column_per_header_field_and_quotes_what_it_must() {
        let at = |s| {
            Some(crate::timestamp(
                chrono::DateTime::from_timestamp(s, 0).expect("a time"),
            ))
        };
        let t = Transaction {
            handoff_id: "ho-1".into(),
            channel: Channel::Sms as i32,
            error_code: "30003, unreachable".into(),
            attempted_at: at(1_800_000_000),
            stages: vec![
                StageTime {
                    stage: FunnelStage::Sent as i32,
                    at: at(1_800_000_001),
                },
                StageTime {
                    stage: FunnelStage::Sent as i32,
                    at: at(1_800_000_009),
                },
            ],
            ..Default::default()
        };
        let header: Vec<String> = header().trim_end().split(',').map(str::to_owned).collect();
        let line = line(&t);
        assert!(line.contains("\"30003, unreachable\""), "{line}");
        let unquoted = line.replace("\"30003, unreachable\"", "x");
        let values: Vec<&str> = unquoted.trim_end().split(',').collect();
        assert_eq!(values.len(), header.len());
        let sent = header.iter().position(|h| h == "sent_at").expect("sent_at");
        assert_eq!(
            values[sent], "2027-01-15T08:00:01.000Z",
            "the first time it was reached"
        );
        assert_eq!(values[4], "SMS");
    }
}
