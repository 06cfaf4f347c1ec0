//! The `c2m.v1.ReportingService` RPCs.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use c2m_proto::v1::{
    self as pb, Channel, FunnelGrouping, FunnelStage, reporting_service_server::ReportingService,
};
use c2m_runtime::{auth::Role, status::FieldViolations};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use crate::{
    Service,
    store::{Bucket, Durations, Grouping, SeriesQuery, StoredEvent},
};

/// Events per RecordEvents call.
const MAX_EVENTS: usize = 1000;
/// Events per ListEvents page: the default and the most.
const EVENTS_PAGE: i32 = 100;
const MAX_EVENTS_PAGE: i32 = 1000;

fn db_status(error: sqlx::Error) -> Status {
    c2m_storage::postgres::db_status("reporting", error)
}

/// A query period: both ends valid, start before end.
/// Buckets one series may have: a year and more of hours, decades of days.
const MAX_BUCKETS: i64 = 10_000;

/// The rates a brand reads, from a row's counts: (delivery, read, response, deflection).
fn rates(counts: &[pb::StageCount]) -> (f64, f64, f64, f64) {
    let count = |stage: FunnelStage| {
        counts
            .iter()
            .find(|c| c.stage == stage as i32)
            .map_or(0, |c| c.count)
    };
    let rate = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            part as f64 / whole as f64
        }
    };
    let (attempted, sent) = (count(FunnelStage::Attempted), count(FunnelStage::Sent));
    let (delivered, read) = (count(FunnelStage::Delivered), count(FunnelStage::Read));
    let responded = count(FunnelStage::Responded);
    (
        rate(delivered, sent),
        rate(read, delivered),
        rate(responded, sent),
        rate(responded, attempted),
    )
}

/// A row's rates from its counts.
fn set_rates(row: &mut pb::FunnelRow) {
    (
        row.delivery_rate,
        row.read_rate,
        row.response_rate,
        row.deflection_rate,
    ) = rates(&row.counts);
}

fn grouping(raw: i32) -> Option<Grouping> {
    Some(match FunnelGrouping::try_from(raw).ok()? {
        FunnelGrouping::Unspecified => Grouping::None,
        FunnelGrouping::Channel => Grouping::Channel,
        FunnelGrouping::HandoffConfig => Grouping::HandoffConfig,
        FunnelGrouping::Skill => Grouping::Skill,
        FunnelGrouping::IvrNumber => Grouping::IvrNumber,
    })
}

fn durations(d: Durations) -> pb::Durations {
    let ms = |v: i64| u64::try_from(v).unwrap_or_default();
    pb::Durations {
        count: d.count,
        p50_ms: ms(d.p50),
        p90_ms: ms(d.p90),
        p99_ms: ms(d.p99),
    }
}

/// Handoffs per export batch.
const EXPORT_BATCH: i64 = 500;

/// Events in handoff order (and, within one, time order) as one transaction per handoff.
fn transactions_of(events: impl IntoIterator<Item = StoredEvent>) -> Vec<pb::Transaction> {
    let mut transactions: Vec<pb::Transaction> = Vec::new();
    for event in events {
        if transactions
            .last()
            .is_none_or(|t| t.handoff_id != event.handoff_id)
        {
            transactions.push(pb::Transaction {
                handoff_id: event.handoff_id.clone(),
                ..Default::default()
            });
        }
        let Some(t) = transactions.last_mut() else {
            continue;
        };
        if let Some(channel) = Channel::from_str_name(event.channel) {
            t.channel = channel as i32;
        }
        for (field, value) in [
            (&mut t.skill_id, &event.skill_id),
            (&mut t.conversation_id, &event.conversation_id),
            (&mut t.error_code, &event.error_code),
        ] {
            if !value.is_empty() {
                field.clone_from(value);
            }
        }
        if event.source != "C2M" && !event.source.is_empty() {
            t.source.clone_from(&event.source);
        }
        t.stages.push(pb::StageTime {
            stage: FunnelStage::from_str_name(event.stage).unwrap_or_default() as i32,
            at: Some(c2m_proto::timestamp(event.occurred_at)),
        });
    }
    transactions
}

/// An export page's events as transactions with what only the export carries: the attempt's
/// time, configuration and IVR number.
fn exported(page: Vec<(chrono::DateTime<chrono::Utc>, StoredEvent)>) -> Vec<pb::Transaction> {
    let mut attempts: std::collections::HashMap<
        String,
        (chrono::DateTime<chrono::Utc>, String, String),
    > = std::collections::HashMap::new();
    for (attempted_at, e) in &page {
        if e.stage == FunnelStage::Attempted.as_str_name() {
            attempts.insert(
                e.handoff_id.clone(),
                (
                    *attempted_at,
                    e.handoff_config_id.clone(),
                    e.ivr_number.clone(),
                ),
            );
        }
    }
    let mut transactions = transactions_of(page.into_iter().map(|(_, e)| e));
    for t in &mut transactions {
        if let Some((at, config, ivr)) = attempts.remove(&t.handoff_id) {
            t.attempted_at = Some(c2m_proto::timestamp(at));
            t.handoff_config_id = config;
            t.ivr_number = ivr;
        }
    }
    transactions
}

/// The instant a local bucket start is: the earlier of two when the clock went back over it,
/// the first after the gap when it went forward over it (a zone whose DST starts at midnight).
fn instant(tz: chrono_tz::Tz, local: chrono::NaiveDateTime) -> chrono::DateTime<chrono::Utc> {
    use chrono::TimeZone;
    (0..=4)
        .find_map(|quarter| {
            tz.from_local_datetime(&(local + chrono::Duration::minutes(15 * quarter)))
                .earliest()
        })
        .map_or_else(|| local.and_utc(), |at| at.with_timezone(&chrono::Utc))
}

/// The period a report covers: `end_time` unset is now, `start_time` unset is a day before the
/// end.
fn period(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>), Status> {
    let mut violations = FieldViolations::new();
    let end = match end {
        None => Some(chrono::Utc::now()),
        Some(end) => c2m_proto::from_timestamp(end),
    };
    let start = match (start, end) {
        (None, Some(end)) => Some(end - chrono::Duration::days(1)),
        (None, None) => None,
        (Some(start), _) => c2m_proto::from_timestamp(start),
    };
    if start.is_none() {
        violations.add("start_time", "not a valid timestamp");
    }
    if end.is_none() {
        violations.add("end_time", "not a valid timestamp");
    }
    match (start, end) {
        (Some(start), Some(end)) if start < end => Ok((start, end)),
        (Some(_), Some(_)) => {
            violations.add("end_time", "must be after start_time");
            Err(violations.into_result().expect_err("one violation"))
        }
        _ => Err(violations.into_result().expect_err("a violation")),
    }
}

/// A stored event as the wire has it.
fn to_wire(event: StoredEvent) -> pb::Event {
    pb::Event {
        event_id: event.event_id,
        account_id: event.account_id,
        stage: FunnelStage::from_str_name(event.stage).unwrap_or_default() as i32,
        occurred_at: Some(c2m_proto::timestamp(event.occurred_at)),
        handoff_id: event.handoff_id,
        handoff_config_id: event.handoff_config_id,
        channel: Channel::from_str_name(event.channel).unwrap_or_default() as i32,
        skill_id: event.skill_id,
        conversation_id: event.conversation_id,
        ivr_number: event.ivr_number,
        error_code: event.error_code,
        source: event.source,
        response_delay_ms: event
            .response_delay_ms
            .and_then(|ms| u64::try_from(ms).ok())
            .unwrap_or_default(),
        consumer_id: event.consumer_id,
    }
}

fn validate(i: usize, event: &pb::Event, violations: &mut FieldViolations) -> Option<StoredEvent> {
    let field = |name: &str| format!("events[{i}].{name}");
    let before = violations.is_empty();
    if event.event_id.is_empty() || event.event_id.len() > 128 {
        violations.add(field("event_id"), "required, at most 128 characters");
    }
    if event.account_id.is_empty() {
        violations.add(field("account_id"), "required");
    }
    if event.consumer_id.len() > 64 {
        violations.add(field("consumer_id"), "at most 64 characters");
    }
    let stage = match FunnelStage::try_from(event.stage) {
        Ok(FunnelStage::Unspecified) | Err(_) => {
            violations.add(field("stage"), "a funnel stage is required");
            None
        }
        Ok(stage) => Some(stage),
    };
    let channel = Channel::try_from(event.channel).unwrap_or_else(|_| {
        violations.add(
            field("channel"),
            format!("{} is not a channel", event.channel),
        );
        Channel::Unspecified
    });
    let occurred_at = event
        .occurred_at
        .as_ref()
        .and_then(c2m_proto::from_timestamp);
    if occurred_at.is_none() {
        violations.add(field("occurred_at"), "a valid timestamp is required");
    }
    if !(before && violations.is_empty()) {
        return None;
    }
    Some(StoredEvent {
        event_id: event.event_id.clone(),
        account_id: event.account_id.clone(),
        stage: stage?.as_str_name(),
        occurred_at: occurred_at?,
        handoff_id: event.handoff_id.clone(),
        handoff_config_id: event.handoff_config_id.clone(),
        channel: if channel == Channel::Unspecified {
            ""
        } else {
            channel.as_str_name()
        },
        skill_id: event.skill_id.clone(),
        conversation_id: event.conversation_id.clone(),
        ivr_number: event.ivr_number.clone(),
        error_code: event.error_code.clone(),
        source: event.source.clone(),
        response_delay_ms: (stage == Some(FunnelStage::Answered))
            .then(|| i64::try_from(event.response_delay_ms).unwrap_or(i64::MAX)),
        consumer_id: event.consumer_id.clone(),
    })
}

impl Service {
    /// The part of a period the log still keeps: from the retention horizon on (empty when the
    /// period ended before it).
    fn retained(
        &self,
        (start, end): (DateTime<Utc>, DateTime<Utc>),
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        match self.horizon(Utc::now()) {
            Some(horizon) if start < horizon => (horizon.min(end), end),
            _ => (start, end),
        }
    }

    /// The account's time zone setting (UTC when it has none).
    async fn account_time_zone(&self, account_id: &str) -> Result<chrono_tz::Tz, Status> {
        let account = self
            .peers
            .config()
            .get_account(pb::GetAccountRequest {
                account_id: account_id.to_owned(),
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => status,
                _ => Status::unavailable(format!(
                    "the account's time zone is unknown (config: {}); name a time_zone",
                    status.message()
                )),
            })?
            .into_inner()
            .account
            .unwrap_or_default();
        let named = account.settings.unwrap_or_default().time_zone;
        Ok(named.parse().unwrap_or(chrono_tz::Tz::UTC))
    }
}

#[tonic::async_trait]
impl ReportingService for Service {
    async fn record_events(
        &self,
        request: Request<pb::RecordEventsRequest>,
    ) -> Result<Response<pb::RecordEventsResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let events = request.into_inner().events;
        let mut violations = FieldViolations::new();
        if events.len() > MAX_EVENTS {
            violations.add("events", format!("at most {MAX_EVENTS} per call"));
        }
        let stored: Vec<StoredEvent> = events
            .iter()
            .enumerate()
            .filter_map(|(i, e)| validate(i, e, &mut violations))
            .collect();
        violations.into_result()?;
        let recorded = self.store.append(&stored).await.map_err(db_status)?;
        Ok(Response::new(pb::RecordEventsResponse {
            recorded: recorded as u32,
            duplicates: (stored.len() as u64 - recorded) as u32,
        }))
    }

    async fn get_funnel(
        &self,
        request: Request<pb::GetFunnelRequest>,
    ) -> Result<Response<pb::GetFunnelResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let request = request.into_inner();
        caller.authorize(&request.account_id, Role::Viewer)?;
        let (start, end) = self.retained(period(
            request.start_time.as_ref(),
            request.end_time.as_ref(),
        )?);
        let mut violations = FieldViolations::new();
        let grouping = grouping(request.group_by).unwrap_or_else(|| {
            violations.add("group_by", "not a grouping");
            Grouping::None
        });
        violations.into_result()?;
        let counts = self
            .store
            .funnel(&request.account_id, start, end, grouping)
            .await
            .map_err(db_status)?;
        let responses = self
            .store
            .first_responses(&request.account_id, start, end, grouping)
            .await
            .map_err(db_status)?;
        let mut rows: BTreeMap<String, pb::FunnelRow> = BTreeMap::new();
        for (group, stage, count) in counts {
            let Some(stage) = FunnelStage::from_str_name(&stage) else {
                continue;
            };
            let row = rows.entry(group.clone()).or_insert_with(|| pb::FunnelRow {
                group,
                ..Default::default()
            });
            row.counts.push(pb::StageCount {
                stage: stage as i32,
                count: count as u64,
            });
        }
        for (group, p50, p90) in responses {
            if let Some(row) = rows.get_mut(&group) {
                row.first_response_p50_ms = u64::try_from(p50).unwrap_or_default();
                row.first_response_p90_ms = u64::try_from(p90).unwrap_or_default();
            }
        }
        // The funnel's order (attempted, sent, delivered, …), as the stages' numbers go.
        for row in rows.values_mut() {
            row.counts.sort_by_key(|c| c.stage);
            set_rates(row);
        }
        Ok(Response::new(pb::GetFunnelResponse {
            rows: rows.into_values().collect(),
        }))
    }

    async fn get_funnel_series(
        &self,
        request: Request<pb::GetFunnelSeriesRequest>,
    ) -> Result<Response<pb::GetFunnelSeriesResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let end = r.end_time;
        let start = r.start_time.or_else(|| {
            let end = match &end {
                Some(end) => c2m_proto::from_timestamp(end)?,
                None => chrono::Utc::now(),
            };
            Some(c2m_proto::timestamp(end - chrono::Duration::days(7)))
        });
        let (start, end) = period(start.as_ref(), end.as_ref())?;
        let mut violations = FieldViolations::new();
        let bucket = match pb::FunnelBucket::try_from(r.bucket) {
            Ok(pb::FunnelBucket::Unspecified | pb::FunnelBucket::Day) => Bucket::Day,
            Ok(pb::FunnelBucket::Hour) => Bucket::Hour,
            Ok(pb::FunnelBucket::Week) => Bucket::Week,
            Err(_) => {
                violations.add("bucket", format!("{} is not a bucket", r.bucket));
                Bucket::Day
            }
        };
        let hours = match bucket {
            Bucket::Hour => 1,
            Bucket::Day => 24,
            Bucket::Week => 168,
        };
        if (end - start).num_hours() / hours > MAX_BUCKETS {
            violations.add(
                "bucket",
                format!(
                    "the period has more than {MAX_BUCKETS} of these buckets; take longer ones"
                ),
            );
        }
        let mut group_by = Vec::new();
        if r.group_by.len() > 2 {
            violations.add("group_by", "at most two dimensions");
        }
        for (i, raw) in r.group_by.iter().enumerate() {
            match grouping(*raw) {
                None | Some(Grouping::None) => violations.add(
                    format!("group_by[{i}]"),
                    format!("{raw} is not a dimension"),
                ),
                Some(g) if group_by.contains(&g) => {
                    violations.add(format!("group_by[{i}]"), "listed twice")
                }
                Some(g) => group_by.push(g),
            }
        }
        let repeat_hours = match r.repeat_window_hours {
            0 => 24,
            h @ 1..=720 => h,
            h => {
                violations.add("repeat_window_hours", "1 to 720 (30 days)");
                h
            }
        };
        let named = r.time_zone.trim();
        let explicit = (!named.is_empty()).then(|| named.parse::<chrono_tz::Tz>());
        if named.len() > 64 {
            violations.add("time_zone", "at most 64 characters");
        } else if let Some(Err(_)) = explicit {
            violations.add(
                "time_zone",
                format!("{named:?} is not an IANA time zone (e.g. America/New_York)"),
            );
        }
        violations.into_result()?;
        let time_zone = match explicit {
            Some(Ok(tz)) => tz,
            _ => self.account_time_zone(&r.account_id).await?,
        };
        // Checked as asked, read as kept.
        let (start, end) = self.retained((start, end));
        let rows = self
            .store
            .series(&SeriesQuery {
                account_id: r.account_id.clone(),
                start,
                end,
                bucket,
                time_zone,
                group_by,
                repeat_window: chrono::Duration::hours(i64::from(repeat_hours)),
            })
            .await
            .map_err(db_status)?;
        let label = match bucket {
            Bucket::Hour => "%Y-%m-%dT%H:%M",
            Bucket::Day | Bucket::Week => "%Y-%m-%d",
        };
        let rows = rows
            .into_iter()
            .map(|row| {
                let mut counts: Vec<pb::StageCount> = row
                    .counts
                    .iter()
                    .filter_map(|(stage, n)| {
                        Some(pb::StageCount {
                            stage: FunnelStage::from_str_name(stage)? as i32,
                            count: u64::try_from(*n).unwrap_or_default(),
                        })
                    })
                    .collect();
                counts.sort_by_key(|c| c.stage);
                let (delivery_rate, read_rate, response_rate, deflection_rate) = rates(&counts);
                pb::FunnelSeriesRow {
                    bucket_start: Some(c2m_proto::timestamp(instant(time_zone, row.bucket))),
                    bucket_label: row.bucket.format(label).to_string(),
                    groups: row.groups,
                    counts,
                    delivery_rate,
                    read_rate,
                    response_rate,
                    deflection_rate,
                    time_to_reply: Some(durations(row.time_to_reply)),
                    time_to_first_response: Some(durations(row.time_to_first_response)),
                    repeat_deflections: row.repeats,
                }
            })
            .collect();
        Ok(Response::new(pb::GetFunnelSeriesResponse {
            time_zone: time_zone.name().to_owned(),
            rows,
        }))
    }

    async fn export_transactions(
        &self,
        request: Request<pb::ExportTransactionsRequest>,
    ) -> Result<Response<BoxStream<pb::ExportTransactionsResponse>>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let period = self.retained(period(r.start_time.as_ref(), r.end_time.as_ref())?);
        let store = self.store.clone();
        // One page is fetched when the client has taken the one before: memory stays one batch.
        let batches = futures::stream::try_unfold(Some(None), move |after| {
            let (store, account_id) = (store.clone(), r.account_id.clone());
            async move {
                let Some(after) = after else {
                    return Ok(None);
                };
                let page = store
                    .export_page(&account_id, period, after.as_ref(), EXPORT_BATCH)
                    .await
                    .map_err(db_status)?;
                let transactions = exported(page);
                if transactions.is_empty() {
                    return Ok(None);
                }
                let next = (transactions.len() as i64 == EXPORT_BATCH).then(|| {
                    transactions.last().and_then(|t| {
                        let at = c2m_proto::from_timestamp(t.attempted_at.as_ref()?)?;
                        Some((at, t.handoff_id.clone()))
                    })
                });
                Ok(Some((
                    pb::ExportTransactionsResponse { transactions },
                    next,
                )))
            }
        });
        Ok(Response::new(Box::pin(batches)))
    }

    async fn list_events(
        &self,
        request: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let mut violations = FieldViolations::new();
        if r.after_position < 0 {
            violations.add("after_position", "a position is 0 or more");
        }
        if !(0..=MAX_EVENTS_PAGE).contains(&r.page_size) {
            violations.add("page_size", format!("0 to {MAX_EVENTS_PAGE}"));
        }
        let since = match &r.since {
            None => None,
            Some(since) => {
                let since = c2m_proto::from_timestamp(since);
                if since.is_none() {
                    violations.add("since", "not a valid timestamp");
                }
                since
            }
        };
        violations.into_result()?;
        let limit = i64::from(if r.page_size == 0 {
            EVENTS_PAGE
        } else {
            r.page_size
        });
        let after = match since {
            Some(since) if r.after_position == 0 => {
                match self
                    .store
                    .position_before(&r.account_id, since)
                    .await
                    .map_err(db_status)?
                {
                    Some(before) => before,
                    // Nothing has occurred since then: nothing to read, and the client asks
                    // the same again.
                    None => {
                        return Ok(Response::new(pb::ListEventsResponse {
                            events: Vec::new(),
                            last_position: 0,
                        }));
                    }
                }
            }
            _ => r.after_position,
        };
        let events = self
            .store
            .events_after(&r.account_id, after, limit)
            .await
            .map_err(db_status)?;
        let last_position = events.last().map_or(after, |(position, _)| *position);
        Ok(Response::new(pb::ListEventsResponse {
            events: events
                .into_iter()
                .map(|(position, event)| pb::LoggedEvent {
                    position,
                    event: Some(to_wire(event)),
                })
                .collect(),
            last_position,
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        if r.handoff_id.len() > 128 {
            return Err(c2m_runtime::status::invalid_field(
                "handoff_id",
                "at most 128 characters",
            ));
        }
        if !r.handoff_id.is_empty() {
            let events = self
                .store
                .handoff_events(&r.account_id, &r.handoff_id)
                .await
                .map_err(db_status)?;
            return Ok(Response::new(pb::ListTransactionsResponse {
                transactions: transactions_of(events),
                next_page_token: String::new(),
            }));
        }
        let (start, end) = self.retained(period(r.start_time.as_ref(), r.end_time.as_ref())?);
        let limit = match r.page_size {
            n if n <= 0 => 50,
            n => i64::from(n.min(500)),
        };
        let events = self
            .store
            .transactions(&r.account_id, start, end, &r.page_token, limit)
            .await
            .map_err(db_status)?;
        let transactions = transactions_of(events);
        let next_page_token = if transactions.len() as i64 == limit {
            transactions
                .last()
                .map(|t| t.handoff_id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListTransactionsResponse {
            transactions,
            next_page_token,
        }))
    }
}
