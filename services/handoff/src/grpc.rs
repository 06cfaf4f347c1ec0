//! The `c2m.v1.HandoffService` RPCs: authenticate, turn the request into a domain deflection,
//! hand it to the engine, answer. What an IVR calls while the caller waits.

use std::time::Instant;

use c2m_proto::v1::{self as pb, handoff_service_server::HandoffService};
use c2m_runtime::{
    auth,
    metrics::{self, HandoffLabels},
};
use tonic::{Request, Response, Status, metadata::MetadataMap};
use tracing::Instrument;

use crate::{Service, error::Error, request::Deflection};

impl Service {
    /// The account an IVR's API key belongs to; the request must be for that account, and the
    /// key for handoffs. A person's token also deflects, for an editor or admin of the account
    /// trying a configuration (the console's "try it").
    async fn authenticate(&self, metadata: &MetadataMap, account_id: &str) -> Result<(), Status> {
        let presented = auth::bearer(metadata)?;
        if !presented.starts_with(auth::API_KEY_PREFIX) {
            return self
                .key
                .caller(metadata)?
                .authorize(account_id, auth::Role::Editor);
        }
        self.api_keys
            .authorize(
                &self.engine.peers,
                presented,
                account_id,
                pb::ApiKeyScope::Handoffs,
            )
            .await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl HandoffService for Service {
    async fn create_handoff(
        &self,
        request: Request<pb::CreateHandoffRequest>,
    ) -> Result<Response<pb::CreateHandoffResponse>, Status> {
        let started = Instant::now();
        let created = async {
            self.authenticate(request.metadata(), &request.get_ref().account_id)
                .await?;
            let (deflection, key) = Deflection::from_create(request.get_ref())?;
            // Taken before anything is read or written, held until the handoff ends.
            let place = self.engine.admission.admit()?;
            // A handoff runs to its end even if the IVR stops waiting (its deadline passed, the
            // call dropped): stopped halfway it would hold its key with nothing recorded, so the
            // IVR's retry would hear "in progress" for a minute, or leave a message sent and no
            // handoff, which a later retry would send again. The retry finds it instead.
            let engine = self.engine.clone();
            let handoff = async move {
                let created = engine.create(deflection, key).await;
                drop(place);
                created
            };
            self.engine
                .detached
                .spawn(handoff.instrument(tracing::Span::current()))
                .await
                .map_err(|failed| Status::internal(format!("the handoff failed: {failed}")))?
                .map_err(Status::from)
        }
        .await;
        let labels = match &created {
            Ok(h) => HandoffLabels {
                status: h.status.as_str_name(),
                channel: h.channel.map_or("", |c| c.as_str_name()),
            },
            Err(refusal) => HandoffLabels {
                status: metrics::code_name(refusal.code()),
                channel: "",
            },
        };
        let m = metrics::metrics();
        m.handoffs.get_or_create(&labels).inc();
        m.handoff_duration
            .observe(metrics::seconds(started.elapsed()));
        Ok(Response::new(pb::CreateHandoffResponse {
            handoff: Some(created?.to_wire(None)),
        }))
    }

    async fn check_eligibility(
        &self,
        request: Request<pb::CheckEligibilityRequest>,
    ) -> Result<Response<pb::CheckEligibilityResponse>, Status> {
        self.authenticate(request.metadata(), &request.get_ref().account_id)
            .await?;
        let deflection = Deflection::from_check(request.get_ref())?;
        let decision = self.engine.decide(&deflection, None).await?;
        Ok(Response::new(pb::CheckEligibilityResponse {
            eligible: decision.blocked.is_none(),
            recommended_channel: decision
                .plan
                .first()
                .map(|s| s.channel)
                .unwrap_or_default()
                .into(),
            available_channels: decision.plan.iter().map(|s| s.channel.into()).collect(),
            channels: decision.channels.iter().map(|c| c.to_wire()).collect(),
            skill_id: decision.skill_id,
        }))
    }

    async fn get_handoff(
        &self,
        request: Request<pb::GetHandoffRequest>,
    ) -> Result<Response<pb::GetHandoffResponse>, Status> {
        self.authenticate(request.metadata(), &request.get_ref().account_id)
            .await?;
        let r = request.into_inner();
        let handoff = self.engine.get(&r.account_id, &r.handoff_id).await?;
        Ok(Response::new(pb::GetHandoffResponse {
            handoff: Some(handoff),
        }))
    }

    async fn flush_deflections(
        &self,
        request: Request<pb::FlushDeflectionsRequest>,
    ) -> Result<Response<pb::FlushDeflectionsResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let shipped = self
            .engine
            .deflections
            .flush()
            .await
            .map_err(|e| Status::from(Error::from(e)))?;
        Ok(Response::new(pb::FlushDeflectionsResponse {
            shipped: u32::try_from(shipped).unwrap_or(u32::MAX),
        }))
    }
}
