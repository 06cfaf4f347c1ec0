//! The `c2m.v1.ChannelGatewayService` RPCs.

use c2m_proto::v1::{
    self as pb, Channel, Provider, channel_gateway_service_server::ChannelGatewayService,
};
use c2m_runtime::{auth::Role, is_e164, mask_phone, status::FieldViolations};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{Service, channels::Capability, credentials, db_status, lookup, window};

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
        let sealed = self.sealer.seal(&r.account_id, provider, &plaintext);
        self.store
            .put_credentials(&r.account_id, provider, &sealed)
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
        let deleted = self
            .store
            .delete_credentials(&r.account_id, provider)
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
        c2m_runtime::media::check(&mut violations, channel, &r.text, &r.media_urls);
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
        if let Some(kind) = lookup::cached(&*self.store, &r.phone)
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
                self.store
                    .remember_line_type(&r.phone, kind)
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
                let devices = self
                    .store
                    .devices(&r.account_id, &r.consumer_id)
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
                let closes = window::closes_at(&*self.store, &r.account_id, &r.phone)
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
        self.store
            .register_device(&r.account_id, &r.consumer_id, platform, &r.device_token)
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
        if !self
            .store
            .remove_device(&r.account_id, &r.consumer_id, &r.device_token)
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
