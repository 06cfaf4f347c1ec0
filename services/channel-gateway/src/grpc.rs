//! The `c2m.v1.ChannelGatewayService` RPCs.

use c2m_proto::v1::{
    self as pb, Channel, FunnelStage, Provider,
    channel_gateway_service_server::ChannelGatewayService,
};
use c2m_runtime::{
    auth::Role,
    is_e164, mask_phone,
    metrics::{self, ProviderSendLabels, SendResult},
    status::{self, FieldViolations},
};
use c2m_storage::batch::Batcher;
use chrono::Utc;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    Service,
    channels::Capability,
    credentials, devices, lookup,
    messages::{self, Claim, Outbound},
    outcome::SendOutcome,
    retry, window,
};

fn db_status(error: sqlx::Error) -> Status {
    c2m_storage::postgres::db_status("gateway", error)
}

#[tonic::async_trait]
impl ChannelGatewayService for Service {
    async fn put_provider_credentials(
        &self,
        request: Request<pb::PutProviderCredentialsRequest>,
    ) -> Result<Response<pb::PutProviderCredentialsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Admin)?;
        let mut violations = FieldViolations::new();
        let (provider, plaintext) = credentials::validated(r.credentials.as_ref(), &mut violations);
        if r.provider != Provider::Unspecified as i32 && r.provider != provider as i32 {
            violations.add("provider", "does not match the credentials given");
        }
        violations.into_result()?;
        credentials::put(
            self.db.pool(),
            &self.sealer,
            &r.account_id,
            provider,
            &plaintext,
        )
        .await
        .map_err(db_status)?;
        self.credentials
            .remove(&(r.account_id.clone(), provider as i32));
        tracing::info!(account_id = %r.account_id, provider = provider.as_str_name(), "provider credentials stored");
        Ok(Response::new(pb::PutProviderCredentialsResponse {}))
    }

    async fn delete_provider_credentials(
        &self,
        request: Request<pb::DeleteProviderCredentialsRequest>,
    ) -> Result<Response<pb::DeleteProviderCredentialsResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Admin)?;
        let provider = Provider::try_from(r.provider)
            .ok()
            .filter(|p| *p != Provider::Unspecified)
            .ok_or_else(|| {
                c2m_runtime::status::invalid_field("provider", "a provider is required")
            })?;
        let deleted = credentials::delete(self.db.pool(), &r.account_id, provider)
            .await
            .map_err(db_status)?;
        self.credentials
            .remove(&(r.account_id.clone(), provider as i32));
        if !deleted {
            return Err(Status::not_found("no such credentials"));
        }
        Ok(Response::new(pb::DeleteProviderCredentialsResponse {}))
    }

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        self.key.caller(request.metadata())?.require_internal()?;
        let r = request.into_inner();
        let mut violations = FieldViolations::new();
        if r.account_id.is_empty() {
            violations.add("account_id", "required");
        }
        if r.message_id.is_empty() || r.message_id.len() > 128 {
            violations.add("message_id", "required, at most 128 characters");
        }
        let channel = Channel::try_from(r.channel).unwrap_or_default();
        if channel == Channel::Unspecified {
            violations.add("channel", "a channel is required");
        }
        if channel == Channel::AppMessaging {
            if r.consumer_id.is_empty() {
                violations.add("consumer_id", "required for CHANNEL_APP_MESSAGING");
            }
        } else if !is_e164(&r.to) {
            violations.add("to", "an E.164 number");
        }
        if channel == Channel::AppleMessages
            && r.apple_messages_invite
                .as_ref()
                .is_none_or(|i| i.business_id.is_empty())
        {
            violations.add(
                "apple_messages_invite.business_id",
                "required for CHANNEL_APPLE_MESSAGES",
            );
        }
        if r.text.trim().is_empty() && r.whatsapp_template.is_none() && r.media_urls.is_empty() {
            violations.add("text", "required");
        }
        if !r.media_urls.is_empty() && channel != Channel::Sms {
            violations.add("media_urls", "only CHANNEL_SMS carries media (as an MMS)");
        }
        status::media_urls(&mut violations, "media_urls", &r.media_urls);
        if r.conversation_id.len() > 128 {
            violations.add("conversation_id", "at most 128 characters");
        }
        violations.into_result()?;

        // Sent to its end even if the caller stops waiting: cut off at the provider, the send
        // would leave a claim with no outcome, and the message (if the provider took it)
        // unconfirmed until its reports came.
        let service = self.clone();
        let send = async move { service.deliver(r, channel).await };
        self.detached
            .spawn(send.instrument(tracing::Span::current()))
            .await
            .map_err(|failed| Status::internal(format!("the send failed: {failed}")))?
    }

    async fn get_message(
        &self,
        request: Request<pb::GetMessageRequest>,
    ) -> Result<Response<pb::GetMessageResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        // Batched with the lookups made at the same moment: Handoff's fallbacks ask for many.
        let message = self
            .lookups
            .run(r.message_id.clone())
            .await
            .map_err(db_status)?
            .filter(|m| m.account_id == r.account_id)
            .ok_or_else(|| Status::not_found(format!("message {} not found", r.message_id)))?;
        Ok(Response::new(pb::GetMessageResponse {
            message: Some(message.to_wire()),
        }))
    }

    async fn lookup_number(
        &self,
        request: Request<pb::LookupNumberRequest>,
    ) -> Result<Response<pb::LookupNumberResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        // A lookup the cache cannot answer is a paid Twilio Lookup: for those who configure the
        // account (and for Handoff), not for everyone who may read it.
        if caller.role != Role::Service {
            caller.authorize(&r.account_id, Role::Editor)?;
        }
        if !is_e164(&r.phone) {
            return Err(c2m_runtime::status::invalid_field(
                "phone",
                "an E.164 number",
            ));
        }
        let answer = |line_type: pb::LineType, source: pb::LookupSource| {
            Ok(Response::new(pb::LookupNumberResponse {
                line_type: line_type as i32,
                source: source as i32,
            }))
        };
        if let Some(kind) = lookup::from_numbering_plan(&r.phone) {
            return answer(kind, pb::LookupSource::NumberingPlan);
        }
        if let Some(kind) = lookup::cached(self.db.pool(), &r.phone)
            .await
            .map_err(db_status)?
        {
            return answer(kind, pb::LookupSource::Cache);
        }
        let creds = match self
            .credentials::<pb::TwilioCredentials>(&r.account_id, Provider::Twilio)
            .await
        {
            Ok(creds) => creds,
            Err(credentials::CredentialsError::Db(e)) => return Err(db_status(e)),
            Err(_) => return answer(pb::LineType::Unknown, pb::LookupSource::Unspecified),
        };
        match lookup::twilio(
            &self.http,
            &self.settings.twilio_lookup_base,
            &creds,
            &r.phone,
        )
        .await
        {
            Ok(kind) => {
                lookup::remember(self.db.pool(), &r.phone, kind)
                    .await
                    .map_err(db_status)?;
                answer(kind, pb::LookupSource::Provider)
            }
            Err(error) => {
                // Unknown rather than an error: a failed lookup must not keep a caller from
                // being deflected.
                tracing::warn!(account_id = %r.account_id, phone = %mask_phone(&r.phone), %error, "number lookup failed");
                answer(pb::LineType::Unknown, pb::LookupSource::Unspecified)
            }
        }
    }

    async fn check_reachability(
        &self,
        request: Request<pb::CheckReachabilityRequest>,
    ) -> Result<Response<pb::CheckReachabilityResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Viewer)?;
        let channel = Channel::try_from(r.channel).unwrap_or_default();
        let mut violations = FieldViolations::new();
        match channel {
            Channel::AppMessaging if r.consumer_id.is_empty() => {
                violations.add("consumer_id", "required for CHANNEL_APP_MESSAGING")
            }
            Channel::Rcs | Channel::Whatsapp if !is_e164(&r.phone) => {
                violations.add("phone", "an E.164 number")
            }
            Channel::Rcs | Channel::Whatsapp | Channel::AppMessaging => {}
            _ => violations.add(
                "channel",
                "reachability is known for CHANNEL_RCS, CHANNEL_WHATSAPP and CHANNEL_APP_MESSAGING",
            ),
        }
        violations.into_result()?;
        let answer = |reachable: bool, detail: String| pb::CheckReachabilityResponse {
            reachable,
            detail,
            ..Default::default()
        };
        let response = match channel {
            Channel::AppMessaging => {
                let devices = devices::of(self.db.pool(), &r.account_id, &r.consumer_id)
                    .await
                    .map_err(db_status)?;
                answer(
                    !devices.is_empty(),
                    format!("{} registered device(s)", devices.len()),
                )
            }
            Channel::Rcs => match self.rcs_capability(&r.account_id, &r.phone).await? {
                Capability::Capable => answer(true, "RCS-capable".into()),
                Capability::NotReachable => answer(false, "not RCS-reachable".into()),
                Capability::NoCredentials => pb::CheckReachabilityResponse {
                    reachable: false,
                    detail: "no google_rbm credentials for the account".into(),
                    no_credentials: true,
                    ..Default::default()
                },
                Capability::Unknown(why) => {
                    // Unknown is not "unreachable": the send itself will tell, and fall back.
                    tracing::warn!(account_id = %r.account_id, phone = %mask_phone(&r.phone), %why, "rcs capability unknown");
                    answer(true, format!("capability unknown: {why}"))
                }
            },
            _ => {
                let closes = window::closes_at(self.db.pool(), &r.account_id, &r.phone)
                    .await
                    .map_err(db_status)?;
                pb::CheckReachabilityResponse {
                    reachable: closes.is_some(),
                    detail: if closes.is_some() {
                        "the customer-service window is open".into()
                    } else {
                        "no message from the consumer in the last 24 hours".into()
                    },
                    window_closes_at: closes.map(c2m_proto::timestamp),
                    no_credentials: false,
                }
            }
        };
        Ok(Response::new(response))
    }

    async fn register_device(
        &self,
        request: Request<pb::RegisterDeviceRequest>,
    ) -> Result<Response<pb::RegisterDeviceResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Editor)?;
        let mut violations = FieldViolations::new();
        if r.consumer_id.is_empty() || r.consumer_id.len() > 256 {
            violations.add("consumer_id", "required, at most 256 characters");
        }
        let platform = pb::DevicePlatform::try_from(r.platform).unwrap_or_default();
        if platform == pb::DevicePlatform::Unspecified {
            violations.add("platform", "DEVICE_PLATFORM_ANDROID or DEVICE_PLATFORM_IOS");
        }
        if r.device_token.is_empty() || r.device_token.len() > 4096 {
            violations.add("device_token", "required, at most 4096 characters");
        } else if platform == pb::DevicePlatform::Ios
            && !(r.device_token.len().is_multiple_of(2)
                && r.device_token.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            violations.add("device_token", "an APNs device token is hexadecimal");
        }
        violations.into_result()?;
        devices::register(
            self.db.pool(),
            &r.account_id,
            &r.consumer_id,
            platform,
            &r.device_token,
        )
        .await
        .map_err(db_status)?;
        Ok(Response::new(pb::RegisterDeviceResponse {}))
    }

    async fn remove_device(
        &self,
        request: Request<pb::RemoveDeviceRequest>,
    ) -> Result<Response<pb::RemoveDeviceResponse>, Status> {
        let caller = self.key.caller(request.metadata())?;
        let r = request.into_inner();
        caller.authorize(&r.account_id, Role::Editor)?;
        if !devices::remove(
            self.db.pool(),
            &r.account_id,
            &r.consumer_id,
            &r.device_token,
        )
        .await
        .map_err(db_status)?
        {
            return Err(Status::not_found(format!(
                "consumer {} has no such device",
                r.consumer_id
            )));
        }
        Ok(Response::new(pb::RemoveDeviceResponse {}))
    }
}

impl Service {
    /// Claims the message id, sends the message on `channel` and records the outcome.
    async fn deliver(
        &self,
        r: pb::SendMessageRequest,
        channel: Channel,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        // The id is claimed before the provider is called: a repeated id gets its first send
        // (or is told to wait while that is at the provider), whatever became of the sender.
        let budget = Duration::from_millis(self.settings.provider_timeout_ms);
        let now = Utc::now();
        let claim = Arc::new(Outbound {
            message_id: r.message_id.clone(),
            account_id: r.account_id.clone(),
            channel,
            handoff_id: r.handoff_id.clone(),
            handoff_config_id: r.handoff_config_id.clone(),
            skill_id: r.skill_id.clone(),
            conversation_id: r.conversation_id.clone(),
            provider_message_id: None,
            stage: FunnelStage::Sent,
            error_code: None,
            error_message: None,
            sent_at: now,
            updated_at: now,
            delivered_at: None,
            read_at: None,
            sending_until: chrono::Duration::from_std(budget + CLAIM_MARGIN)
                .ok()
                .map(|d| now + d),
            claimed_by: Some(uuid::Uuid::new_v4().to_string()),
        });
        // A claim whose answer was lost may have been made: asked again (its token finds it)
        // for as long as the send could take, so that the id's fate is known before the provider
        // is called. A claim left behind by a send that then gives up would later read as sent
        // at the provider and lost: it is taken back as soon as PostgreSQL allows.
        let claimed = self
            .claims
            .run_until(claim.clone(), Instant::now() + budget, |error, _| {
                tracing::debug!(%error, message_id = %claim.message_id, "message id claim asked again");
            })
            .await;
        let claimed = match claimed {
            Ok(claimed) => claimed,
            Err(error) => {
                self.detached
                    .spawn(take_back(self.db.pool().clone(), claim.clone()));
                return Err(db_status(error));
            }
        };
        match claimed {
            Claim::Mine => {}
            Claim::Earlier(first) if first.in_flight(Utc::now()) => {
                return Err(status::aborted_retry(
                    format!("message {} is at its provider now", first.message_id),
                    budget,
                ));
            }
            // Sent before, failed before, or claimed by a sender that died at the provider
            // (unconfirmed: its reports settle it).
            Claim::Earlier(first) => {
                return Ok(Response::new(pb::SendMessageResponse {
                    message: Some(first.to_wire()),
                }));
            }
            Claim::Foreign => {
                return Err(status::invalid_field(
                    "message_id",
                    "already used by another account",
                ));
            }
        }
        let outcome = match retry::within(budget, self.send_on(channel, &r)).await {
            (Ok(outcome), _) => outcome,
            // Refused before any message left (no credentials, storage away): the claim is taken
            // back, so that a retry of the id sends it.
            (Err(status), false) => {
                self.detached
                    .spawn(take_back(self.db.pool().clone(), claim.clone()));
                return Err(status);
            }
            // A message may be at a provider: the claim stays, and reads as unconfirmed once
            // its time is past, for the provider's reports to settle.
            (Err(status), true) => {
                tracing::warn!(message_id = %r.message_id, %status, "send failed after its message was handed to a provider; it may have it");
                return Err(status);
            }
        };
        // Twilio 21610: the recipient replied STOP to this sender; do not try them here again.
        if let SendOutcome::Failed { code, .. } = &outcome
            && matches!(channel, Channel::Sms | Channel::AppleMessages)
            && code == "21610"
            && let Err(status) = self
                .peers
                .routing()
                .record_opt_out(pb::RecordOptOutRequest {
                    account_id: r.account_id.clone(),
                    consumer_phone: r.to.clone(),
                    channel: Channel::Sms as i32,
                    source: "twilio:21610".into(),
                })
                .await
        {
            tracing::warn!(%status, "opt-out from twilio 21610 not recorded");
        }
        metrics::metrics()
            .provider_sends
            .get_or_create(&ProviderSendLabels {
                channel: channel.as_str_name(),
                outcome: match &outcome {
                    SendOutcome::Accepted { .. } => SendResult::accepted,
                    SendOutcome::Failed { .. } => SendResult::failed,
                    SendOutcome::Unconfirmed { .. } => SendResult::unconfirmed,
                },
            })
            .inc();
        let (stage, provider_id, error_code, error_message) = match outcome {
            SendOutcome::Accepted { sid } => (FunnelStage::Sent, Some(sid), None, None),
            SendOutcome::Failed { code, message } => {
                (FunnelStage::Failed, None, Some(code), Some(message))
            }
            // Sent as far as anyone can tell, without the provider's id: the message stays
            // unconfirmed until the provider reports on it (`messages::advance`).
            SendOutcome::Unconfirmed { why } => {
                tracing::warn!(message_id = %r.message_id, channel = channel.as_str_name(), %why, "provider did not answer the send; it may have the message");
                (FunnelStage::Sent, None, None, None)
            }
        };
        let outbound = Arc::new(Outbound {
            provider_message_id: provider_id,
            stage,
            error_code,
            error_message,
            updated_at: Utc::now(),
            sending_until: None,
            ..Arc::unwrap_or_clone(claim)
        });
        let message = match self.records.run(outbound.clone()).await {
            Ok(recorded) => recorded.unwrap_or_else(|| Arc::unwrap_or_clone(outbound)),
            // The provider has answered: that is the answer, whatever PostgreSQL says now. An
            // error would have the caller try its next channel, and the consumer could get two
            // messages. The claim stands meanwhile (a retry of the id is not sent again), and the
            // outcome follows once PostgreSQL takes it.
            Err(error) => {
                tracing::warn!(%error, message_id = %outbound.message_id, "send's outcome not recorded; recording it when PostgreSQL takes it");
                self.detached
                    .spawn(record_later(self.records.clone(), outbound.clone()));
                Arc::unwrap_or_clone(outbound)
            }
        };
        tracing::info!(
            account_id = %message.account_id,
            message_id = %message.message_id,
            channel = channel.as_str_name(),
            to = %mask_phone(&r.to),
            stage = message.stage.as_str_name(),
            error_code = message.error_code.as_deref().unwrap_or(""),
            "message sent"
        );
        Ok(Response::new(pb::SendMessageResponse {
            message: Some(message.to_wire()),
        }))
    }
}

/// How long past the provider's budget a claim is held before a retry of its id may take it for
/// abandoned: the sender's own record of the outcome takes a moment after the provider answers.
const CLAIM_MARGIN: Duration = Duration::from_secs(2);

/// Deletes a claim its send gave up before calling the provider (PostgreSQL did not answer
/// whether it was made), trying for as long as the claim would otherwise hold.
async fn take_back(pool: sqlx::PgPool, claim: Arc<Outbound>) {
    let until = Instant::now() + RECORD_PERSISTENCE;
    let mut pause = Duration::from_millis(50);
    loop {
        let deleted = sqlx::query(
            "DELETE FROM outbound_messages WHERE message_id = $1 AND claimed_by = $2 \
             AND provider_message_id IS NULL",
        )
        .bind(&claim.message_id)
        .bind(&claim.claimed_by)
        .execute(&pool)
        .await;
        match deleted {
            Ok(_) => return,
            Err(error) if Instant::now() + pause < until => {
                tracing::debug!(%error, message_id = %claim.message_id, "unused claim not taken back yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(error) => {
                tracing::error!(%error, message_id = %claim.message_id, "unused claim never taken back: it will read as unconfirmed");
                return;
            }
        }
    }
}

/// How long a sent message's record is offered to PostgreSQL before it is given up (logged).
const RECORD_PERSISTENCE: Duration = Duration::from_secs(300);

/// Records a message the provider took while PostgreSQL refused its record, offering it again
/// until it is written or [`RECORD_PERSISTENCE`] has passed.
async fn record_later(records: Batcher<messages::Records>, message: Arc<Outbound>) {
    let message_id = message.message_id.clone();
    let give_up = Instant::now() + RECORD_PERSISTENCE;
    let recorded = records
        .run_until(message, give_up, |error, _| {
            tracing::debug!(%error, %message_id, "message record refused again");
            metrics::metrics().message_record_retries.inc();
        })
        .await;
    match recorded {
        Ok(_) => tracing::info!(%message_id, "sent message recorded after all"),
        Err(error) => {
            tracing::error!(%error, %message_id, "sent message never recorded: its status webhooks will find nothing");
        }
    }
}
