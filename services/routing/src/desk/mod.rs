//! `c2m.v1.ConversationService`: where agents and bots see, claim, answer, transfer and close
//! the conversations deflections opened. Each RPC checks who calls (an agent sees only its
//! skills' conversations), validates, and changes the conversation with its log event in one
//! transaction; `store` holds the statements, `reply` the way a message goes to the consumer.

mod reply;
mod store;

use c2m_proto::v1::{self as pb, conversation_service_server::ConversationService};
use c2m_runtime::{
    api_keys,
    auth::ConversationAccess,
    status::{self, FieldViolations},
};
use tonic::{Code, Request, Response, Status};

use crate::{
    Service,
    log::{self, EventStream},
    store::Listing,
};
use store::Assignment;
pub(crate) use store::Closing;

/// The longest id a caller may name.
const MAX_ID: usize = 128;
/// The most skills one stream may name.
const MAX_SKILLS: usize = 50;
/// The longest close reason.
const MAX_REASON: usize = 256;

/// What can go wrong with a conversation RPC, each mapped once to its gRPC status.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DeskError {
    #[error("conversation {0} not found")]
    NotFound(String),
    #[error("conversation {0} is closed")]
    Closed(String),
    #[error("conversation {id} is assigned to {holder}")]
    Assigned { id: String, holder: String },
    #[error("{0}")]
    Denied(&'static str),
    #[error(transparent)]
    Status(#[from] Status),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

impl From<DeskError> for Status {
    fn from(error: DeskError) -> Self {
        let message = error.to_string();
        match error {
            DeskError::NotFound(_) => Status::not_found(message),
            DeskError::Closed(id) => status::with_reason(
                Code::FailedPrecondition,
                message,
                "CONVERSATION_CLOSED",
                [("conversation_id", id)],
            ),
            DeskError::Assigned { holder, .. } => status::with_reason(
                Code::Aborted,
                message,
                "CONVERSATION_ASSIGNED",
                [("assignee", holder)],
            ),
            DeskError::Denied(why) => Status::permission_denied(why),
            DeskError::Status(status) => status,
            DeskError::Db(error) => c2m_storage::postgres::db_status("routing", error),
        }
    }
}

/// A required id of at most [`MAX_ID`] characters.
pub(crate) fn id(violations: &mut FieldViolations, field: &str, value: &str) {
    if value.is_empty() {
        violations.add(field, "required");
    } else if value.len() > MAX_ID {
        violations.add(field, format!("at most {MAX_ID} characters"));
    }
}

impl Service {
    /// What the caller may do with `account_id`'s conversations: from its token's role, or from
    /// an API key with the conversations scope (a bot or desk integration: an agent of every
    /// skill, acting as `key:<name>`).
    pub(crate) async fn access(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        account_id: &str,
    ) -> Result<ConversationAccess, Status> {
        let presented = c2m_runtime::auth::bearer(metadata)?;
        if !presented.starts_with(api_keys::PREFIX) {
            return self.key.caller(metadata)?.conversations(account_id);
        }
        let key = self
            .api_keys
            .authorize(
                &self.peers,
                presented,
                account_id,
                pb::ApiKeyScope::Conversations,
            )
            .await?;
        Ok(ConversationAccess {
            actor: format!("key:{}", key.name),
            skills: None,
            act: true,
            supervise: false,
        })
    }
}

/// The caller's access to the account's conversations, and the id of the one it names.
async fn caller(
    service: &Service,
    metadata: &tonic::metadata::MetadataMap,
    account_id: &str,
    conversation_id: &str,
) -> Result<ConversationAccess, Status> {
    let access = service.access(metadata, account_id).await?;
    let mut violations = FieldViolations::new();
    id(&mut violations, "conversation_id", conversation_id);
    violations.into_result()?;
    Ok(access)
}

/// The caller may change conversations, not only read them.
fn acting(access: &ConversationAccess) -> Result<(), DeskError> {
    if access.act {
        Ok(())
    } else {
        Err(DeskError::Denied(
            "reading conversations is all this caller may do: answering, claiming, transferring and closing need an agent, editor or admin",
        ))
    }
}

#[tonic::async_trait]
impl ConversationService for Service {
    async fn list_conversations(
        &self,
        request: Request<pb::ListConversationsRequest>,
    ) -> Result<Response<pb::ListConversationsResponse>, Status> {
        let r = request.get_ref();
        let access = self.access(request.metadata(), &r.account_id).await?;
        let listing = Listing::from_wire(r, &access)?;
        let (conversations, next_page_token) = store::list(&*self.store, &listing)
            .await
            .map_err(DeskError::from)?;
        Ok(Response::new(pb::ListConversationsResponse {
            conversations,
            next_page_token,
        }))
    }

    async fn get_conversation(
        &self,
        request: Request<pb::GetConversationRequest>,
    ) -> Result<Response<pb::GetConversationResponse>, Status> {
        let r = request.get_ref();
        let access = caller(self, request.metadata(), &r.account_id, &r.conversation_id).await?;
        let conversation = self
            .store
            .conversation(&r.account_id, &r.conversation_id)
            .await
            .map_err(DeskError::from)?
            .filter(|c| access.sees(&c.skill_id))
            .ok_or_else(|| DeskError::NotFound(r.conversation_id.clone()))?;
        Ok(Response::new(pb::GetConversationResponse {
            conversation: Some(conversation),
        }))
    }

    async fn watch_conversations(
        &self,
        request: Request<pb::WatchConversationsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let access = self
            .access(request.metadata(), &request.get_ref().account_id)
            .await?;
        let r = request.into_inner();
        let mut violations = FieldViolations::new();
        if r.skill_ids.len() > MAX_SKILLS {
            violations.add("skill_ids", format!("at most {MAX_SKILLS}"));
        }
        for (i, skill) in r.skill_ids.iter().enumerate() {
            if skill.is_empty() || skill.len() > MAX_ID {
                violations.add(
                    format!("skill_ids[{i}]"),
                    format!("a skill id of 1 to {MAX_ID} characters"),
                );
            } else if !access.sees(skill) {
                violations.add(
                    format!("skill_ids[{i}]"),
                    format!("{skill} is not one of the caller's skills"),
                );
            }
        }
        let since = r.since.as_ref().map(c2m_proto::from_timestamp);
        if since == Some(None) {
            violations.add("since", "not a valid timestamp");
        }
        let after = match r.cursor.as_str() {
            "" => None,
            cursor => {
                let position = log::position(cursor, &r.account_id);
                if position.is_none() {
                    violations.add("cursor", "not a cursor of this account's stream");
                }
                position
            }
        };
        violations.into_result()?;
        // A cursor whose next events the log has forgotten would leave a hole: refused. A
        // `since` older than the log starts at the oldest event kept.
        if let Some(position) = after {
            let oldest = self
                .store
                .log_oldest_kept(&r.account_id)
                .await
                .map_err(DeskError::from)?;
            if position + 1 < oldest {
                return Err(status::with_reason(
                    Code::OutOfRange,
                    format!(
                        "the cursor is older than the log keeps ({} days): the events after it are \
                         gone; start again with `since`",
                        self.log_retention.as_secs() / 86_400
                    ),
                    "CURSOR_EXPIRED",
                    [("oldest_kept", oldest.to_string())],
                ));
            }
        }
        let after = match (after, since.flatten()) {
            (None, Some(since)) => Some(
                self.store
                    .log_before(&r.account_id, since)
                    .await
                    .map_err(DeskError::from)?,
            ),
            (after, _) => after,
        };
        // The skills shown: those asked for, else all the caller may see.
        let skills = if r.skill_ids.is_empty() {
            access.skills.clone()
        } else {
            Some(r.skill_ids)
        };
        let shows = move |skill: &str| skills.as_ref().is_none_or(|s| s.iter().any(|k| k == skill));
        let filter: log::Filter = Box::new(move |event: &pb::ConversationEvent| {
            let moved_from = match &event.kind {
                Some(pb::conversation_event::Kind::Transferred(t)) => t.from_skill_id.as_str(),
                _ => "",
            };
            shows(&event.skill_id) || (!moved_from.is_empty() && shows(moved_from))
        });
        let stream = self
            .feed
            .watch(r.account_id, after, filter)
            .await
            .map_err(DeskError::from)?;
        Ok(Response::new(stream))
    }

    async fn assign_conversation(
        &self,
        request: Request<pb::AssignConversationRequest>,
    ) -> Result<Response<pb::AssignConversationResponse>, Status> {
        let r = request.get_ref();
        let access = caller(self, request.metadata(), &r.account_id, &r.conversation_id).await?;
        acting(&access)?;
        let assignee = if r.assignee.is_empty() {
            access.actor.clone()
        } else {
            r.assignee.clone()
        };
        let mut violations = FieldViolations::new();
        if assignee.len() > MAX_ID {
            violations.add("assignee", format!("at most {MAX_ID} characters"));
        }
        if r.from_assignee.len() > MAX_ID {
            violations.add("from_assignee", format!("at most {MAX_ID} characters"));
        }
        violations.into_result()?;
        if assignee != access.actor && !access.supervise {
            return Err(DeskError::Denied(
                "an agent claims conversations for itself; editors and admins assign them to others",
            )
            .into());
        }
        let from = Some(r.from_assignee.as_str()).filter(|f| !f.is_empty());
        if from.is_some_and(|f| f != access.actor) && !access.supervise {
            return Err(DeskError::Denied(
                "taking a conversation from another agent needs an editor or admin",
            )
            .into());
        }
        let conversation = store::change(
            self,
            &r.account_id,
            &r.conversation_id,
            &access,
            Assignment::Assign {
                assignee: &assignee,
                from,
            },
        )
        .await?;
        Ok(Response::new(pb::AssignConversationResponse {
            conversation: Some(conversation),
        }))
    }

    async fn release_conversation(
        &self,
        request: Request<pb::ReleaseConversationRequest>,
    ) -> Result<Response<pb::ReleaseConversationResponse>, Status> {
        let r = request.get_ref();
        let access = caller(self, request.metadata(), &r.account_id, &r.conversation_id).await?;
        acting(&access)?;
        let conversation = store::change(
            self,
            &r.account_id,
            &r.conversation_id,
            &access,
            Assignment::Release,
        )
        .await?;
        Ok(Response::new(pb::ReleaseConversationResponse {
            conversation: Some(conversation),
        }))
    }

    async fn transfer_conversation(
        &self,
        request: Request<pb::TransferConversationRequest>,
    ) -> Result<Response<pb::TransferConversationResponse>, Status> {
        let r = request.get_ref();
        let access = caller(self, request.metadata(), &r.account_id, &r.conversation_id).await?;
        acting(&access)?;
        let mut violations = FieldViolations::new();
        id(&mut violations, "skill_id", &r.skill_id);
        violations.into_result()?;
        let conversation = store::change(
            self,
            &r.account_id,
            &r.conversation_id,
            &access,
            Assignment::Transfer { to: &r.skill_id },
        )
        .await?;
        Ok(Response::new(pb::TransferConversationResponse {
            conversation: Some(conversation),
        }))
    }

    async fn close_conversation(
        &self,
        request: Request<pb::CloseConversationRequest>,
    ) -> Result<Response<pb::CloseConversationResponse>, Status> {
        let r = request.get_ref();
        let access = caller(self, request.metadata(), &r.account_id, &r.conversation_id).await?;
        acting(&access)?;
        if r.reason.len() > MAX_REASON {
            return Err(status::invalid_field(
                "reason",
                format!("at most {MAX_REASON} characters"),
            ));
        }
        let reason = if r.reason.is_empty() {
            "closed"
        } else {
            r.reason.as_str()
        };
        let conversation = self
            .close(Closing {
                account_id: &r.account_id,
                conversation_id: &r.conversation_id,
                reason,
                by: &access.actor,
                skills: access.skills.as_deref(),
                idle_since: None,
            })
            .await?
            .ok_or_else(|| DeskError::NotFound(r.conversation_id.clone()))?;
        Ok(Response::new(pb::CloseConversationResponse {
            conversation: Some(conversation),
        }))
    }

    async fn list_consent_changes(
        &self,
        request: Request<pb::ListConsentChangesRequest>,
    ) -> Result<Response<pb::ListConsentChangesResponse>, Status> {
        let r = request.get_ref();
        self.access(request.metadata(), &r.account_id).await?;
        let mut violations = FieldViolations::new();
        if !r.consumer_phone.is_empty() && !c2m_runtime::is_e164(&r.consumer_phone) {
            violations.add("consumer_phone", "an E.164 number");
        }
        let channel = match pb::Channel::try_from(r.channel) {
            Ok(pb::Channel::Unspecified) => None,
            Ok(channel) => Some(channel),
            Err(_) => {
                violations.add("channel", format!("{} is not a channel", r.channel));
                None
            }
        };
        let after = match r.page_token.as_str() {
            "" => 0,
            token => token.parse::<i64>().unwrap_or_else(|_| {
                violations.add("page_token", "not a token this service gave out");
                0
            }),
        };
        violations.into_result()?;
        let limit = match r.page_size {
            n if n <= 0 => 100,
            n => i64::from(n.min(1000)),
        };
        let consumer = Some(r.consumer_phone.as_str()).filter(|p| !p.is_empty());
        let page = self
            .store
            .consent_changes(&r.account_id, consumer, channel, after, limit)
            .await
            .map_err(DeskError::from)?;
        let next_page_token = match page.last() {
            Some((id, _)) if page.len() as i64 == limit => id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListConsentChangesResponse {
            changes: page.into_iter().map(|(_, change)| change).collect(),
            next_page_token,
        }))
    }

    async fn send_conversation_message(
        &self,
        request: Request<pb::SendConversationMessageRequest>,
    ) -> Result<Response<pb::SendConversationMessageResponse>, Status> {
        let r = request.get_ref();
        let access = caller(self, request.metadata(), &r.account_id, &r.conversation_id).await?;
        acting(&access)?;
        let entry = reply::send(self, &access, r).await?;
        Ok(Response::new(pb::SendConversationMessageResponse {
            entry: Some(entry),
        }))
    }
}
