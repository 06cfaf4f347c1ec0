//! Media in a message, as each channel carries it. Both the conversation API (before it writes
//! the transcript) and the gateway (before it calls a provider) check a message against these
//! rules, so a refusal names the field and never reaches a provider.
//!
//! - SMS: up to [`MAX_MEDIA_URLS`](crate::status::MAX_MEDIA_URLS) files, sent as an MMS with the
//!   text as its body.
//! - WhatsApp: one file per message, its type read from the URL's extension; images, videos and
//!   documents carry the text as a caption (at most 1,024 characters), audio and stickers carry no
//!   text.
//! - RCS: one file per message; with text, a rich card whose description is the text (at most
//!   2,000 characters).
//! - Apple Messages for Business and app messaging: text only.

use c2m_proto::v1::Channel;

use crate::status::{FieldViolations, media_urls};

/// WhatsApp's caption limit.
pub const MAX_WHATSAPP_CAPTION: usize = 1024;
/// An RCS rich card's description limit.
pub const MAX_RCS_CARD_DESCRIPTION: usize = 2000;

/// The kind of a media file, as WhatsApp's message types name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    Image,
    Video,
    Audio,
    Sticker,
    Document,
}

impl MediaKind {
    /// From the extension of the URL's path (query and fragment ignored); a document when the
    /// extension says nothing else.
    pub fn of(url: &str) -> Self {
        let path = url.split(['?', '#']).next().unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or_default();
        let extension = name
            .rsplit_once('.')
            .map(|(_, e)| e.to_ascii_lowercase())
            .unwrap_or_default();
        match extension.as_str() {
            "jpg" | "jpeg" | "png" => Self::Image,
            "mp4" | "3gp" => Self::Video,
            "aac" | "amr" | "mp3" | "m4a" | "ogg" | "opus" => Self::Audio,
            "webp" => Self::Sticker,
            _ => Self::Document,
        }
    }

    /// WhatsApp's `type` for it.
    pub fn whatsapp_type(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::Video => "video",
            Self::Audio => "audio",
            Self::Sticker => "sticker",
            Self::Document => "document",
        }
    }

    /// Whether WhatsApp shows a caption with it.
    pub fn takes_caption(self) -> bool {
        matches!(self, Self::Image | Self::Video | Self::Document)
    }
}

/// Checks `urls` (the field `media_urls`) and the `text` beside them for `channel`.
pub fn check(violations: &mut FieldViolations, channel: Channel, text: &str, urls: &[String]) {
    media_urls(violations, "media_urls", urls);
    if urls.is_empty() {
        return;
    }
    let on = channel.as_str_name();
    let chars = text.chars().count();
    match channel {
        Channel::Sms => {}
        Channel::Whatsapp | Channel::Rcs if urls.len() > 1 => {
            violations.add("media_urls", format!("{on} carries one file per message"));
        }
        Channel::Whatsapp => {
            let kind = MediaKind::of(&urls[0]);
            if !text.trim().is_empty() && !kind.takes_caption() {
                violations.add(
                    "text",
                    format!(
                        "WhatsApp shows no text with {} files; send the text as its own message",
                        kind.whatsapp_type()
                    ),
                );
            } else if chars > MAX_WHATSAPP_CAPTION {
                violations.add(
                    "text",
                    format!("at most {MAX_WHATSAPP_CAPTION} characters with a file on {on}"),
                );
            }
        }
        Channel::Rcs => {
            if chars > MAX_RCS_CARD_DESCRIPTION {
                violations.add(
                    "text",
                    format!("at most {MAX_RCS_CARD_DESCRIPTION} characters with a file on {on}"),
                );
            }
        }
        Channel::AppleMessages | Channel::AppMessaging | Channel::Unspecified => {
            violations.add("media_urls", format!("{on} carries text only"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_kind_is_read_from_its_extension() {
        assert_eq!(
            MediaKind::of("https://a.example/bill.PNG"),
            MediaKind::Image
        );
        assert_eq!(
            MediaKind::of("https://a.example/v/clip.mp4?sig=x.pdf"),
            MediaKind::Video
        );
        assert_eq!(
            MediaKind::of("https://a.example/note.ogg#t=1"),
            MediaKind::Audio
        );
        assert_eq!(
            MediaKind::of("https://a.example/smile.webp"),
            MediaKind::Sticker
        );
        assert_eq!(
            MediaKind::of("https://a.example/bill.pdf"),
            MediaKind::Document
        );
        assert_eq!(
            MediaKind::of("https://a.example/download"),
            MediaKind::Document
        );
        assert_eq!(MediaKind::of("https://a.example.png/"), MediaKind::Document);
    }

    fn refusals(channel: Channel, text: &str, urls: &[&str]) -> Vec<(String, String)> {
        let urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
        let mut violations = FieldViolations::new();
        check(&mut violations, channel, text, &urls);
        match violations.into_result() {
            Ok(()) => Vec::new(),
            Err(status) => {
                use tonic_types::StatusExt;
                status
                    .get_details_bad_request()
                    .expect("field violations")
                    .field_violations
                    .into_iter()
                    .map(|v| (v.field, v.description))
                    .collect()
            }
        }
    }

    #[test]
    fn each_channel_carries_what_its_provider_does() {
        let bill = "https://acme.example.com/bill.pdf";
        let note = "https://acme.example.com/note.mp3";
        assert!(refusals(Channel::Sms, "Your bill", &[bill, note]).is_empty());
        assert!(refusals(Channel::Whatsapp, "Your bill", &[bill]).is_empty());
        assert!(refusals(Channel::Whatsapp, "", &[note]).is_empty());
        assert!(refusals(Channel::Rcs, "Your bill", &[bill]).is_empty());
        let fields = |r: Vec<(String, String)>| -> Vec<String> {
            r.into_iter().map(|(field, _)| field).collect()
        };
        assert_eq!(
            fields(refusals(Channel::Whatsapp, "", &[bill, note])),
            ["media_urls"]
        );
        assert_eq!(
            fields(refusals(Channel::Rcs, "", &[bill, note])),
            ["media_urls"]
        );
        assert_eq!(
            fields(refusals(Channel::Whatsapp, "Listen", &[note])),
            ["text"]
        );
        let long = "a".repeat(MAX_WHATSAPP_CAPTION + 1);
        assert_eq!(
            fields(refusals(Channel::Whatsapp, &long, &[bill])),
            ["text"]
        );
        assert!(refusals(Channel::Rcs, &long, &[bill]).is_empty());
        let longer = "a".repeat(MAX_RCS_CARD_DESCRIPTION + 1);
        assert_eq!(fields(refusals(Channel::Rcs, &longer, &[bill])), ["text"]);
        assert_eq!(
            fields(refusals(Channel::AppMessaging, "", &[bill])),
            ["media_urls"]
        );
    }
}
