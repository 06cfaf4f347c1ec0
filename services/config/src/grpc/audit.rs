//! The audit log.

use c2m_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::*;

pub(super) async fn list_audit_events(
    service: &Service,
    request: Request<pb::ListAuditEventsRequest>,
) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
    let caller = service.key.caller(request.metadata())?;
    let r = request.into_inner();
    caller.authorize(&r.account_id, Role::Admin)?;
    let start = r
        .start_time
        .as_ref()
        .and_then(c2m_proto::from_timestamp)
        .unwrap_or(chrono::DateTime::UNIX_EPOCH);
    let end = r
        .end_time
        .as_ref()
        .and_then(c2m_proto::from_timestamp)
        .unwrap_or_else(|| Utc::now() + chrono::Duration::days(1));
    let after = match after_token(&r.page_token)?.as_str() {
        "" => 0,
        id => id.parse().map_err(|_| {
            status::invalid_field("page_token", "not a token this service gave out")
        })?,
    };
    let limit = page_size(r.page_size);
    let records = service
        .store
        .audit(&r.account_id, start, end, after, limit)
        .await
        .map_err(store_status)?;
    let json =
        |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or_default();
    Ok(Response::new(pb::ListAuditEventsResponse {
        next_page_token: next_token(
            records.last().map(|e| e.id.to_string()).as_deref(),
            records.len() as i64 == limit,
        ),
        events: records
            .iter()
            .map(|e| pb::AuditEvent {
                audit_event_id: e.id.to_string(),
                account_id: e.account_id.clone(),
                actor: e.actor.clone(),
                action: e.action.clone(),
                resource: e.resource.clone(),
                before_json: json(&e.before),
                after_json: json(&e.after),
                at: Some(c2m_proto::timestamp(e.at)),
            })
            .collect(),
    }))
}
