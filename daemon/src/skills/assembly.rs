//! Prompt assembly: where skills go in a chat prompt and which token ids they become.
//!
//! A request with skills is the conversation `[system: skill 1] … [system: skill n]` followed
//! by the client's own messages, rendered with the model's chat template, skills in canonical
//! (name) order. So that the tokens of a skill never depend on what follows it, the prompt is
//! tokenized piecewise: the rendering of the first `k` skill messages must be a prefix of the
//! rendering of the first `k + 1` and of the whole prompt, and each difference is tokenized on
//! its own. The pinned KV of a skill is the tokens of `[system: skill]` alone — exactly the
//! prefix of every request whose first skill it is, so the radix cache reuses it bit for bit.
//! Templates that do not render message lists prefix-stably are detected and reported as an
//! error instead of silently producing tokens the cache cannot match.
//!
//! Two assembly modes serve the skill segments ([`Assembly`], a skill's `spec.assembly`):
//! `exact` reuses KV only through the radix prefix (bit-exact; combinations are cached lazily
//! by the requests that compute them), `modular` serves a later skill's segment from its own
//! pinned KV, copied and re-rotated to the segment's position ([`modular_spans`]). The rule
//! when modes mix is per skill: the first skill is always exact (it starts at position 0, where
//! its pinned KV is the exact prefix), and every later skill marked `modular` is copied; tokens
//! of exact skills after a copied one are computed on top of it.

use std::ops::Range;

use skillkv_api::v1alpha1::Assembly;

use crate::engine::ModularSpan;
use crate::engine::chat_template::{ChatMessage, ChatTemplate, RenderTemplateError};
use crate::engine::tokenizer::{EncodeTextError, GgufTokenizer};

/// Default of [`crate::skills::SkillsConfig::modular_recompute_tokens`]: how many leading
/// tokens of each copied skill segment are computed in context. On SmolLM2-135M (`skillkv bench
/// modular`, docs/benchmarks.md) 16 halves the first-token KL against exact assembly and raises
/// greedy agreement from 10 to 17 of 32 tokens, for 16 tokens of prefill per copied skill.
pub const DEFAULT_MODULAR_RECOMPUTE_TOKENS: usize = 16;

/// The role skill messages are rendered with.
pub const SKILL_ROLE: &str = "system";

/// A chat prompt with its skills, tokenized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembledPrompt {
    /// Every prompt token.
    pub tokens: Vec<u32>,
    /// For each skill, in order, the token range its segment occupies.
    pub skill_spans: Vec<Range<usize>>,
}

/// Why a prompt could not be assembled.
#[derive(Debug, thiserror::Error)]
pub enum AssemblePromptError {
    /// The chat template failed.
    #[error(transparent)]
    Render(#[from] RenderTemplateError),
    /// The tokenizer failed.
    #[error(transparent)]
    Encode(#[from] EncodeTextError),
    /// The template does not render a longer conversation as an extension of a shorter one, so
    /// skill segments cannot be cached independently of what follows them.
    #[error(
        "the chat template does not render skill messages prefix-stably (after {skills} skills)"
    )]
    NotPrefixStable {
        /// Skill messages rendered when the check failed.
        skills: usize,
    },
}

/// The skill messages for `skill_texts`, in the given order.
fn skill_messages<'a>(skill_texts: impl IntoIterator<Item = &'a str>) -> Vec<ChatMessage> {
    skill_texts
        .into_iter()
        .map(|text| ChatMessage::new(SKILL_ROLE, text))
        .collect()
}

/// A skill on its own: `[system: SKILL.md]` rendered by the chat template, and its tokens —
/// what is prefilled and pinned for it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizedSkill {
    /// The rendering.
    pub rendered: String,
    /// Its tokens.
    pub tokens: Vec<u32>,
}

/// Renders and tokenizes a skill on its own.
pub fn tokenize_skill(
    template: &ChatTemplate,
    tokenizer: &GgufTokenizer,
    skill_text: &str,
) -> Result<TokenizedSkill, AssemblePromptError> {
    let rendered = template.render(&skill_messages([skill_text]), false)?;
    let tokens = tokenizer.encode(&rendered)?;
    Ok(TokenizedSkill { rendered, tokens })
}

/// What assembly needs of a skill: its text, and, when the caller keeps them, its rendering
/// alone with that rendering's tokens (a skill version does: [`TokenizedSkill`]).
pub trait PromptSkill {
    /// The SKILL.md text.
    fn text(&self) -> &str;

    /// The skill rendered alone and its tokens. A segment of the prompt that renders exactly
    /// so — the first skill always, later ones wherever the template renders a message the same
    /// at any position, as ChatML does — takes these tokens instead of being tokenized again
    /// (~5 ms per 2,000-token skill on every request otherwise).
    fn rendered_alone(&self) -> Option<(&str, &[u32])> {
        None
    }
}

impl PromptSkill for &str {
    fn text(&self) -> &str {
        self
    }
}

/// A skill's text with its kept rendering and tokens.
impl PromptSkill for (&str, &TokenizedSkill) {
    fn text(&self) -> &str {
        self.0
    }

    fn rendered_alone(&self) -> Option<(&str, &[u32])> {
        Some((&self.1.rendered, &self.1.tokens))
    }
}

/// Assembles `[skills…][conversation]` (with the assistant header at the end). `skills` must
/// already be in canonical order.
pub fn assemble_chat<S: PromptSkill>(
    template: &ChatTemplate,
    tokenizer: &GgufTokenizer,
    skills: &[S],
    conversation: &[ChatMessage],
) -> Result<AssembledPrompt, AssemblePromptError> {
    let mut messages = skill_messages(skills.iter().map(PromptSkill::text));
    messages.extend(conversation.iter().cloned());
    let full = template.render(&messages, true)?;
    let mut tokens = Vec::new();
    let mut skill_spans = Vec::with_capacity(skills.len());
    let mut rendered = 0;
    for (count, skill) in (1..).zip(skills) {
        let prefix = template.render(&messages[..count], false)?;
        if !full.starts_with(&prefix) || prefix.len() < rendered {
            return Err(AssemblePromptError::NotPrefixStable { skills: count });
        }
        let start = tokens.len();
        let segment = &prefix[rendered..];
        match skill.rendered_alone() {
            Some((alone, alone_tokens)) if !alone.is_empty() && alone == segment => {
                tokens.extend_from_slice(alone_tokens);
            }
            _ => tokens.extend(tokenizer.encode(segment)?),
        }
        skill_spans.push(start..tokens.len());
        rendered = prefix.len();
    }
    tokens.extend(tokenizer.encode(&full[rendered..])?);
    Ok(AssembledPrompt {
        tokens,
        skill_spans,
    })
}

/// The segments of a prompt that modular assembly copies: the spans of every skill after the
/// first whose mode is [`Assembly::Modular`], each with its first `recompute` tokens computed in
/// context. `skills` are the prompt's skills in order, with their mode and segment.
pub fn modular_spans(skills: &[(Assembly, Range<usize>)], recompute: usize) -> Vec<ModularSpan> {
    skills
        .iter()
        .skip(1)
        .filter(|(assembly, span)| *assembly == Assembly::Modular && !span.is_empty())
        .map(|(_, span)| ModularSpan {
            start: span.start,
            len: span.len(),
            recompute,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{TinyModelSpec, tiny_tokenizer_and_template};

    fn fixtures() -> (GgufTokenizer, ChatTemplate) {
        tiny_tokenizer_and_template(&TinyModelSpec::default()).expect("tiny model")
    }

    #[test]
    fn a_skill_alone_is_the_prefix_of_every_request_it_leads() {
        let (tokenizer, template) = fixtures();
        let skill = "---\nname: alpha\ndescription: a\n---\nAlways answer in haiku.";
        let alone = tokenize_skill(&template, &tokenizer, skill)
            .expect("tokens")
            .tokens;
        let other = "---\nname: beta\ndescription: b\n---\nCite sources.";
        let conversation = [ChatMessage::new("user", "hello there")];
        let prompt =
            assemble_chat(&template, &tokenizer, &[skill, other], &conversation).expect("prompt");
        assert!(prompt.tokens.starts_with(&alone));
        assert_eq!(prompt.skill_spans[0], 0..alone.len());
        assert_eq!(prompt.skill_spans[1].start, alone.len());
        assert!(prompt.skill_spans[1].end < prompt.tokens.len());
    }

    #[test]
    fn a_segment_that_renders_as_the_skill_alone_takes_its_kept_tokens() {
        let (tokenizer, template) = fixtures();
        let (first, second) = (
            "---\nname: alpha\ndescription: a\n---\nAlways answer in haiku.",
            "---\nname: beta\ndescription: b\n---\nCite sources.",
        );
        let conversation = [ChatMessage::new("user", "hello there")];
        let plain =
            assemble_chat(&template, &tokenizer, &[first, second], &conversation).expect("prompt");
        // Kept tokens that are a marker, to see where they are used.
        let marked = |text| {
            let mut alone = tokenize_skill(&template, &tokenizer, text).expect("tokens");
            alone.tokens = vec![7; 3];
            alone
        };
        let (first_kept, second_kept) = (marked(first), marked(second));
        let reused = assemble_chat(
            &template,
            &tokenizer,
            &[(first, &first_kept), (second, &second_kept)],
            &conversation,
        )
        .expect("prompt");
        // The tiny template renders a system message the same at any position.
        assert_eq!(reused.skill_spans, [0..3, 3..6]);
        assert_eq!(reused.tokens[..6], [7; 6]);
        assert_eq!(reused.tokens[6..], plain.tokens[plain.skill_spans[1].end..]);
        // A rendering that is not the segment's is not used.
        let mut stale = marked(first);
        stale.rendered.push(' ');
        let fresh = assemble_chat(&template, &tokenizer, &[(first, &stale)], &conversation)
            .expect("prompt");
        let fresh_plain = assemble_chat(&template, &tokenizer, &[first], &conversation);
        assert_eq!(fresh.tokens, fresh_plain.expect("prompt").tokens);
    }

    #[test]
    fn modular_spans_skip_the_first_skill_and_exact_ones() {
        let skills = [
            (Assembly::Modular, 0..40),
            (Assembly::Exact, 40..70),
            (Assembly::Modular, 70..99),
        ];
        assert_eq!(
            modular_spans(&skills, 4),
            vec![ModularSpan {
                start: 70,
                len: 29,
                recompute: 4
            }]
        );
        assert!(modular_spans(&skills[..2], 0).is_empty());
    }

    #[test]
    fn without_skills_the_prompt_is_the_plain_rendering() {
        let (tokenizer, template) = fixtures();
        let conversation = [
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "hi"),
        ];
        let prompt =
            assemble_chat::<&str>(&template, &tokenizer, &[], &conversation).expect("prompt");
        let plain = tokenizer
            .encode(&template.render(&conversation, true).expect("render"))
            .expect("encode");
        assert_eq!(prompt.tokens, plain);
        assert!(prompt.skill_spans.is_empty());
    }

    #[test]
    fn a_template_that_is_not_prefix_stable_is_refused() {
        let (tokenizer, _) = fixtures();
        // Renders the message count first, so a longer list is not an extension of a shorter.
        let template = ChatTemplate::new(
            "{{ messages|length }}{% for m in messages %}{{ m.content }}{% endfor %}".to_string(),
            String::new(),
            String::new(),
        )
        .expect("compiles");
        let error = assemble_chat(
            &template,
            &tokenizer,
            &["skill"],
            &[ChatMessage::new("user", "q")],
        )
        .expect_err("not prefix-stable");
        assert!(matches!(
            error,
            AssemblePromptError::NotPrefixStable { skills: 1 }
        ));
    }
}
