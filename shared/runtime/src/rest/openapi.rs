//! The OpenAPI document of the REST API (the handoff role's calls for IVRs, the routing role's
//! for desks and bots), generated from the protobuf descriptors, so it cannot drift from the
//! contract; `proto/openapi.json` is the committed copy, checked against the generated one by a
//! test.

use prost_reflect::{Cardinality, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use super::POOL;

const TIMESTAMP: &str = "google.protobuf.Timestamp";

fn reference(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

fn scalar(field: &FieldDescriptor, schemas: &mut Map<String, Value>) -> Value {
    match field.kind() {
        Kind::Double | Kind::Float => json!({ "type": "number" }),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            json!({ "type": "integer", "format": "int32" })
        }
        Kind::Uint32 | Kind::Fixed32 => {
            json!({ "type": "integer", "format": "int32", "minimum": 0 })
        }
        // proto3 JSON writes 64-bit integers as strings.
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            json!({ "type": "string", "format": "int64" })
        }
        Kind::Bool => json!({ "type": "boolean" }),
        Kind::String => json!({ "type": "string" }),
        Kind::Bytes => json!({ "type": "string", "format": "byte" }),
        Kind::Enum(e) => {
            let name = e.full_name().to_owned();
            schemas.entry(name.clone()).or_insert_with(|| {
                json!({
                    "type": "string",
                    "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>(),
                })
            });
            reference(&name)
        }
        Kind::Message(m) if m.full_name() == TIMESTAMP => {
            json!({ "type": "string", "format": "date-time" })
        }
        Kind::Message(m) => {
            add_message(&m, schemas);
            reference(m.full_name())
        }
    }
}

fn field_schema(field: &FieldDescriptor, schemas: &mut Map<String, Value>) -> Value {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            unreachable!("map fields are messages");
        };
        let value = entry.map_entry_value_field();
        return json!({ "type": "object", "additionalProperties": scalar(&value, schemas) });
    }
    let item = scalar(field, schemas);
    if field.cardinality() == Cardinality::Repeated {
        json!({ "type": "array", "items": item })
    } else {
        item
    }
}

fn add_message(message: &MessageDescriptor, schemas: &mut Map<String, Value>) {
    let name = message.full_name().to_owned();
    if schemas.contains_key(&name) {
        return;
    }
    // Placeholder first: messages may refer to themselves.
    schemas.insert(name.clone(), Value::Null);
    let mut properties = Map::new();
    for field in message.fields() {
        let schema = field_schema(&field, schemas);
        properties.insert(field.json_name().to_owned(), schema);
    }
    schemas.insert(
        name,
        json!({ "type": "object", "properties": properties, "additionalProperties": false }),
    );
}

/// How an operation takes its request: none beyond the path, a JSON body, or the query string.
enum Input<'a> {
    Path,
    Body(&'a str),
    Query(&'a str),
}

fn operation(
    id: &str,
    summary: &str,
    input: Input<'_>,
    response: &str,
    schemas: &mut Map<String, Value>,
) -> Value {
    let message = |name: &str| {
        POOL.get_message_by_name(name)
            .unwrap_or_else(|| panic!("{name} is in the descriptor set"))
    };
    add_message(&message(response), schemas);
    let mut op = json!({
        "operationId": id,
        "summary": summary,
        "security": [{ "bearer": [] }],
        "responses": {
            "200": {
                "description": "OK",
                "content": { "application/json": { "schema": reference(response) } },
            },
            "default": {
                "description": "An error: the gRPC status, its HTTP equivalent and details",
                "content": { "application/json": { "schema": reference("Error") } },
            },
        },
    });
    match input {
        Input::Path => {}
        Input::Body(request) => {
            add_message(&message(request), schemas);
            op["requestBody"] = json!({
                "required": true,
                "content": { "application/json": { "schema": reference(request) } },
            });
        }
        Input::Query(request) => {
            let parameters: Vec<Value> = message(request)
                .fields()
                .filter(|f| f.name() != "account_id")
                .map(|f| {
                    json!({
                        "name": f.json_name(),
                        "in": "query",
                        "required": false,
                        "schema": scalar(&f, schemas),
                    })
                })
                .collect();
            op["parameters"] = Value::Array(parameters);
        }
    }
    op
}

fn path_parameter(name: &str) -> Value {
    json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } })
}

/// The OpenAPI 3.1 document, as pretty JSON (keys sorted, so it is stable).
pub fn document() -> String {
    let mut schemas = Map::new();
    let mut op = |id: &str, summary: &str, input: Input<'_>, response: &str| {
        operation(id, summary, input, response, &mut schemas)
    };
    let create = op(
        "CreateHandoff",
        "Deflect a caller: send the first message on the first eligible channel",
        Input::Body("c2m.v1.CreateHandoffRequest"),
        "c2m.v1.CreateHandoffResponse",
    );
    let check = op(
        "CheckEligibility",
        "What CreateHandoff would do, without side effects",
        Input::Body("c2m.v1.CheckEligibilityRequest"),
        "c2m.v1.CheckEligibilityResponse",
    );
    let get = op(
        "GetHandoff",
        "A handoff with its delivery progress",
        Input::Path,
        "c2m.v1.GetHandoffResponse",
    );
    let list_conversations = op(
        "ListConversations",
        "Conversations, newest first, filtered and paged (without transcripts)",
        Input::Query("c2m.v1.ListConversationsRequest"),
        "c2m.v1.ListConversationsResponse",
    );
    let get_conversation = op(
        "GetConversation",
        "A conversation with its whole transcript",
        Input::Path,
        "c2m.v1.GetConversationResponse",
    );
    let send = op(
        "SendConversationMessage",
        "Answer the consumer on the conversation's channel (idempotent on clientMessageId)",
        Input::Body("c2m.v1.SendConversationMessageRequest"),
        "c2m.v1.SendConversationMessageResponse",
    );
    let assign = op(
        "AssignConversation",
        "Claim a conversation (409 ABORTED naming the holder when someone else has it)",
        Input::Body("c2m.v1.AssignConversationRequest"),
        "c2m.v1.AssignConversationResponse",
    );
    let release = op(
        "ReleaseConversation",
        "Give a conversation back to its skill's queue",
        Input::Body("c2m.v1.ReleaseConversationRequest"),
        "c2m.v1.ReleaseConversationResponse",
    );
    let transfer = op(
        "TransferConversation",
        "Move a conversation to another skill",
        Input::Body("c2m.v1.TransferConversationRequest"),
        "c2m.v1.TransferConversationResponse",
    );
    let close = op(
        "CloseConversation",
        "Close a conversation; the consumer can be deflected again at once",
        Input::Body("c2m.v1.CloseConversationRequest"),
        "c2m.v1.CloseConversationResponse",
    );
    let consent = op(
        "ListConsentChanges",
        "Consumers' opt-outs and opt-ins, oldest first",
        Input::Query("c2m.v1.ListConsentChangesRequest"),
        "c2m.v1.ListConsentChangesResponse",
    );
    schemas.insert(
        "Error".into(),
        json!({
            "type": "object",
            "properties": {
                "code": { "type": "integer", "description": "the gRPC status code" },
                "status": { "type": "string", "description": "its name, e.g. INVALID_ARGUMENT" },
                "message": { "type": "string" },
                "details": {
                    "type": "array",
                    "items": { "type": "object", "description": "google.rpc.BadRequest (fieldViolations) or google.rpc.RetryInfo (retryDelay)" },
                },
            },
        }),
    );
    let account = path_parameter("account_id");
    let conversation = [account.clone(), path_parameter("conversation_id")];
    let conversations = "/v1/accounts/{account_id}/conversations/{conversation_id}";
    let doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "c2m REST API",
            "version": "v1",
            "description": "The gRPC calls for clients that can only make HTTP calls: HandoffService for IVRs (served by the handoff role; authenticate with the account's API key, `Authorization: Bearer c2m_…`) and ConversationService for desks and bots (served by the routing role; a token with the agent, editor or admin role; a live stream is gRPC's WatchConversations, or the account's signed webhooks). Bodies are the proto3 JSON mapping of c2m.v1 (lowerCamelCase names; snake_case is accepted too); query parameters likewise. The ids in the path win over any in the body.",
        },
        "paths": {
            "/v1/accounts/{account_id}/handoffs": {
                "parameters": [account.clone()],
                "post": create,
            },
            "/v1/accounts/{account_id}/eligibility": {
                "parameters": [account.clone()],
                "post": check,
            },
            "/v1/accounts/{account_id}/handoffs/{handoff_id}": {
                "parameters": [account.clone(), path_parameter("handoff_id")],
                "get": get,
            },
            "/v1/accounts/{account_id}/conversations": {
                "parameters": [account.clone()],
                "get": list_conversations,
            },
            conversations: { "parameters": conversation.clone(), "get": get_conversation },
            format!("{conversations}/messages"): { "parameters": conversation.clone(), "post": send },
            format!("{conversations}/assign"): { "parameters": conversation.clone(), "post": assign },
            format!("{conversations}/release"): { "parameters": conversation.clone(), "post": release },
            format!("{conversations}/transfer"): { "parameters": conversation.clone(), "post": transfer },
            format!("{conversations}/close"): { "parameters": conversation, "post": close },
            "/v1/accounts/{account_id}/consent-changes": {
                "parameters": [account],
                "get": consent,
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": { "type": "http", "scheme": "bearer", "description": "The account's API key (handoffs) or a signed token (conversations)" },
            },
            "schemas": schemas,
        },
    });
    let mut text = serde_json::to_string_pretty(&doc).expect("json values serialize");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::document;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../proto/openapi.json");

    /// The committed document is the one the contract generates. After changing the proto, run
    /// `C2M_UPDATE_OPENAPI=1 cargo test -p c2m-runtime openapi` and commit the file.
    #[test]
    fn the_committed_openapi_document_matches_the_contract() {
        let generated = document();
        if std::env::var_os("C2M_UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &generated).expect("writes openapi.json");
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == generated,
            "proto/openapi.json is stale: run `C2M_UPDATE_OPENAPI=1 cargo test -p c2m-runtime openapi` and commit it"
        );
    }

    #[test]
    fn every_request_field_is_documented() {
        let doc: serde_json::Value = serde_json::from_str(&document()).expect("json");
        let properties = &doc["components"]["schemas"]["c2m.v1.CreateHandoffRequest"]["properties"];
        for field in [
            "accountId",
            "consumerPhone",
            "idempotencyKey",
            "templateVariables",
            "engagementAttributes",
            "overrideChannel",
        ] {
            assert!(properties.get(field).is_some(), "{field} missing");
        }
        assert_eq!(
            properties["templateVariables"]["additionalProperties"]["type"],
            "string"
        );
        assert_eq!(
            doc["components"]["schemas"]["c2m.v1.Channel"]["enum"][1],
            "CHANNEL_SMS"
        );
    }
}
