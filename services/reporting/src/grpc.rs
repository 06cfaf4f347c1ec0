//! The `c2m.v1.ReportingService` RPCs.

use std::collections::BTreeMap;

use c2m_proto::v1::{
    self as pb, Channel, FunnelGrouping, FunnelStage, reporting_service_server::ReportingService,
};
use c2m_runtime::{auth::Role, status::FieldViolations};
use tonic::{Request, Response, Status};

use crate::{
    Service,
    store::{Grouping, StoredEvent},
};

/// Events per RecordEvents call.
const MAX_EVENTS: usize = 1000;

fn db_status(error: sqlx::Error) -> Status {
    c2m_storage::postgres::db_status("reporting", error)
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
    })
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
        let mut violations = FieldViolations::new();
        let start = request
            .start_time
            .as_ref()
            .and_then(c2m_proto::from_timestamp);
        let end = request
            .end_time
            .as_ref()
            .and_then(c2m_proto::from_timestamp);
        if start.is_none() {
            violations.add("start_time", "a valid timestamp is required");
        }
        if end.is_none() {
            violations.add("end_time", "a valid timestamp is required");
        }
        if let (Some(start), Some(end)) = (start, end)
            && start >= end
        {
            violations.add("end_time", "must be after start_time");
        }
        let grouping = match FunnelGrouping::try_from(request.group_by) {
            Ok(FunnelGrouping::Unspecified) => Grouping::None,
            Ok(FunnelGrouping::Channel) => Grouping::Channel,
            Ok(FunnelGrouping::HandoffConfig) => Grouping::HandoffConfig,
            Ok(FunnelGrouping::Skill) => Grouping::Skill,
            Ok(FunnelGrouping::IvrNumber) => Grouping::IvrNumber,
            Err(_) => {
                violations.add("group_by", "not a grouping");
                Grouping::None
            }
        };
        violations.into_result()?;
        let (Some(start), Some(end)) = (start, end) else {
            return Err(Status::internal("validated above"));
        };
        let counts = self
            .store
            .funnel(&request.account_id, start, end, grouping)
            .await
            .map_err(db_status)?;
        let mut rows: BTreeMap<String, Vec<pb::StageCount>> = BTreeMap::new();
        for (group, stage, count) in counts {
            let Some(stage) = FunnelStage::from_str_name(&stage) else {
                continue;
            };
            rows.entry(group).or_default().push(pb::StageCount {
                stage: stage as i32,
                count: count as u64,
            });
        }
        Ok(Response::new(pb::GetFunnelResponse {
            rows: rows
                .into_iter()
                .map(|(group, counts)| pb::FunnelRow { group, counts })
                .collect(),
        }))
    }
}
