#pragma once
// The request side of the Anthropic provider (docs/gateway.md, "Anthropic"), private to
// keel_gateway: an OpenAI chat-completions body translated into an Anthropic Messages
// body. Pure functions of their arguments, no I/O: thread-safe, and what they return is
// the caller's.

#include <cstdint>
#include <string_view>

#include "keel/core/json.h"
#include "keel/core/result.h"

namespace keel::gateway::detail {

/// The string `v` holds; `fallback` when `v` is null or not a string. The view points
/// into `*v` (or `fallback`) and lives as long as it does.
std::string_view StringOr(const json::value* v, std::string_view fallback = {});

/// The integer `v` holds (a double truncated, an unsigned beyond INT64_MAX clamped);
/// `fallback` when `v` is null or not a number.
int64_t IntOr(const json::value* v, int64_t fallback = 0);

/// Translates an OpenAI chat-completions body into an Anthropic Messages body
/// (docs/gateway.md, "Anthropic", has the table):
///   - system and developer messages, wherever they are, become the top-level `system`,
///     their texts joined by blank lines;
///   - user, assistant and tool messages keep their order; consecutive ones of the same
///     Anthropic role are merged (a tool message is a `tool_result` block of a user
///     message, so consecutive tool results and the user text after them are one message);
///   - content strings and `text` parts are text blocks (empty ones dropped); `image_url`
///     parts of user and tool messages are image blocks, in their place among the texts: a
///     `data:<media type>;base64,<data>` URL a base64 source (image/jpeg, image/png,
///     image/gif or image/webp), an http(s) URL a url source; `detail` is dropped;
///   - a tool message's blocks are its tool_result's `content` ("" when it has none);
///   - an assistant's `tool_calls` are tool_use blocks after its text (`content` may be
///     null); a final assistant message is sent as the prefill, its trailing whitespace
///     trimmed (Anthropic refuses it);
///   - a message's content of one text block is sent as a plain string;
///   - tools, tool_choice, max_tokens, temperature (clamped to 0..1), top_p and stop are
///     translated; other fields, other roles and other part types are dropped. `stream`
///     is left to the caller.
///
/// Errors, all kInvalidRequest with `param` the path at fault:
///   - `messages` not an array ("messages");
///   - a `file` or `input_audio` part, which the Anthropic format does not take, or an
///     `image_url` part in a system or assistant message ("messages[1].content[0]");
///   - an image URL that is neither http(s) nor a base64 data URL, a data URL that is not
///     base64, or of a media type other than the four above
///     ("messages[2].content[1].image_url.url");
///   - no user, assistant or tool message with anything to send ("messages");
///   - `max_tokens` (or `max_completion_tokens`) not a positive integer.
Result<json::object> ToAnthropicRequest(const json::object& in);

}  // namespace keel::gateway::detail
