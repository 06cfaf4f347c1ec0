//! The `c2m.v1.RoutingService` RPCs.

use c2m_proto::v1::{self as pb, Channel, FunnelStage, routing_service_server::RoutingService};
use c2m_runtime::status::{FieldViolations, invalid_field};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::{
    Service,
    conversations::Inbound,
    db_status, required,
    store::{Consumer, Deflection},
};

/// The most deflections one RecordDeflections call may carry.
const MAX_DEFLECTIONS: usize = 1000;

#[tonic::async_trait]
impl RoutingService for Service {
    async fn resolve_skill(
        &self,
        request: Request<pb::ResolveSkillRequest>,
    ) -> Result<Response<pb::ResolveSkillResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let request = request.into_inner();
        if !request.override_skill_id.is_empty() {
            return Ok(Response::new(pb::ResolveSkillResponse {
                skill_id: request.override_skill_id,
            }));
        }
        let config = self
            .peers
            .config()
            .get_handoff_config(pb::GetHandoffConfigRequest {
                account_id: request.account_id,
                handoff_config_id: request.handoff_config_id,
            })
            .await?
            .into_inner()
            .config
            .ok_or_else(|| Status::internal("config answered without a configuration"))?;
        Ok(Response::new(pb::ResolveSkillResponse {
            skill_id: config.skill_id,
        }))
    }

    async fn check_consumer(
        &self,
        request: Request<pb::CheckConsumerRequest>,
    ) -> Result<Response<pb::CheckConsumerResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let request = request.into_inner();
        let Consumer {
            conversation,
            opted_out,
            pending_invite,
        } = self
            .checks
            .run((
                request.account_id.clone(),
                request.consumer_phone.clone(),
                i32::try_from(request.pending_invite_hours).unwrap_or(i32::MAX),
            ))
            .await
            .map_err(db_status)?;
        if let Some(conversation_id) = &conversation {
            // Handoff asks only when the Redis lease is absent: Redis lost it, write it back.
            self.set_lease(
                &request.account_id,
                &request.consumer_phone,
                Some(conversation_id),
            )
            .await;
        }
        Ok(Response::new(pb::CheckConsumerResponse {
            conversation_open: conversation.is_some(),
            conversation_id: conversation.unwrap_or_default(),
            opted_out_channels: opted_out
                .iter()
                .filter_map(|c| Channel::from_str_name(c))
                .map(|c| c as i32)
                .collect(),
            pending_invite_handoff_id: pending_invite.unwrap_or_default(),
        }))
    }

    async fn record_deflections(
        &self,
        request: Request<pb::RecordDeflectionsRequest>,
    ) -> Result<Response<pb::RecordDeflectionsResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let r = request.into_inner();
        if r.deflections.len() > MAX_DEFLECTIONS {
            return Err(invalid_field(
                "deflections",
                format!("at most {MAX_DEFLECTIONS} in one call"),
            ));
        }
        let mut violations = FieldViolations::new();
        let mut rows = Vec::with_capacity(r.deflections.len());
        for (i, d) in r.deflections.into_iter().enumerate() {
            let field = |name: &str| format!("deflections[{i}].{name}");
            for (name, value) in [
                ("account_id", &d.account_id),
                ("handoff_id", &d.handoff_id),
                ("consumer_phone", &d.consumer_phone),
                ("skill_id", &d.skill_id),
            ] {
                required(&mut violations, &field(name), value);
            }
            let channel = Channel::try_from(d.channel)
                .ok()
                .filter(|c| *c != Channel::Unspecified);
            if channel.is_none() {
                violations.add(field("channel"), "a channel is required");
            }
            let sent_at = d.sent_at.as_ref().and_then(c2m_proto::from_timestamp);
            if sent_at.is_none() {
                violations.add(field("sent_at"), "a valid timestamp is required");
            }
            let (Some(channel), Some(sent_at)) = (channel, sent_at) else {
                continue;
            };
            rows.push(Deflection {
                handoff_id: d.handoff_id,
                account_id: d.account_id,
                handoff_config_id: d.handoff_config_id,
                ivr_number: d.ivr_number,
                consumer_phone: d.consumer_phone,
                channel: channel.as_str_name().to_owned(),
                skill_id: d.skill_id,
                first_message: d.first_message,
                engagement_attributes: d.engagement_attributes.unwrap_or_default().encode_to_vec(),
                sent_at,
            });
        }
        violations.into_result()?;
        self.store
            .record_deflections(rows)
            .await
            .map_err(db_status)?;
        Ok(Response::new(pb::RecordDeflectionsResponse {}))
    }

    async fn route_inbound_message(
        &self,
        request: Request<pb::RouteInboundMessageRequest>,
    ) -> Result<Response<pb::RouteInboundMessageResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let r = request.into_inner();
        let mut violations = FieldViolations::new();
        required(&mut violations, "account_id", &r.account_id);
        required(&mut violations, "consumer_address", &r.consumer_address);
        violations.into_result()?;
        let inbound = Inbound {
            account_id: &r.account_id,
            consumer: &r.consumer_address,
            channel: Channel::try_from(r.channel).unwrap_or_default(),
            text: &r.text,
            provider_message_id: &r.provider_message_id,
            received_at: r
                .received_at
                .as_ref()
                .and_then(c2m_proto::from_timestamp)
                .unwrap_or_else(chrono::Utc::now),
            lookback_hours: self.lookback_hours(&r.account_id).await,
            any_channel: false,
        };
        let routed = self.route_reply(inbound).await?;
        Ok(Response::new(pb::RouteInboundMessageResponse {
            conversation_id: routed.conversation_id,
            opened: routed.opened,
            handoff_id: routed.handoff_id,
        }))
    }

    async fn record_message_stages(
        &self,
        request: Request<pb::RecordMessageStagesRequest>,
    ) -> Result<Response<pb::RecordMessageStagesResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let stages = request.into_inner().stages;
        let mut violations = FieldViolations::new();
        if stages.len() > MAX_DEFLECTIONS {
            violations.add("stages", format!("at most {MAX_DEFLECTIONS} in one call"));
        }
        for (i, s) in stages.iter().enumerate() {
            required(
                &mut violations,
                &format!("stages[{i}].account_id"),
                &s.account_id,
            );
            required(
                &mut violations,
                &format!("stages[{i}].message_id"),
                &s.message_id,
            );
            if !matches!(
                FunnelStage::try_from(s.stage),
                Ok(FunnelStage::Sent
                    | FunnelStage::Delivered
                    | FunnelStage::Read
                    | FunnelStage::Failed)
            ) {
                violations.add(
                    format!("stages[{i}].stage"),
                    "SENT, DELIVERED, READ or FAILED",
                );
            }
        }
        violations.into_result()?;
        // In the order reported: a later report of one message finds the earlier one written.
        for stage in &stages {
            self.record_stage(stage).await.map_err(db_status)?;
        }
        Ok(Response::new(pb::RecordMessageStagesResponse {}))
    }

    async fn record_opt_out(
        &self,
        request: Request<pb::RecordOptOutRequest>,
    ) -> Result<Response<pb::RecordOptOutResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let r = request.into_inner();
        self.record_consent(
            &r.account_id,
            &r.consumer_phone,
            r.channel,
            &r.source,
            false,
        )
        .await?;
        Ok(Response::new(pb::RecordOptOutResponse {}))
    }

    async fn record_opt_in(
        &self,
        request: Request<pb::RecordOptInRequest>,
    ) -> Result<Response<pb::RecordOptInResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let r = request.into_inner();
        self.record_consent(&r.account_id, &r.consumer_phone, r.channel, &r.source, true)
            .await?;
        Ok(Response::new(pb::RecordOptInResponse {}))
    }
}
