//! The model's chat template: turns a conversation into prompt text.
//!
//! Owns [`ChatTemplate`], the Jinja template stored in a GGUF file's `tokenizer.chat_template`,
//! rendered with minijinja the way Hugging Face `transformers` renders it (`trim_blocks`,
//! `lstrip_blocks`, Python string methods through minijinja-contrib's pycompat, a
//! `raise_exception` function and the `bos_token` / `eos_token` variables).

use std::collections::BTreeMap;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, ErrorKind, Value, context};

const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const TEMPLATE_NAME: &str = "chat_template";

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadTemplateError {
    #[error("GGUF metadata lacks `{KEY_CHAT_TEMPLATE}`")]
    MissingTemplate,
    #[error("GGUF metadata `{KEY_CHAT_TEMPLATE}` is not a string")]
    TemplateNotString,
    #[error("the chat template does not compile: {source:#}")]
    Compile {
        #[source]
        source: minijinja::Error,
    },
}

/// Why a conversation could not be rendered.
#[derive(Debug, thiserror::Error)]
#[error("rendering the chat template failed: {source:#}")]
pub struct RenderTemplateError {
    #[source]
    source: minijinja::Error,
}

/// A compiled chat template and the special-token texts it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    environment: Environment<'static>,
    bos_token: String,
    eos_token: String,
    digest: String,
}

impl ChatTemplate {
    /// Loads `tokenizer.chat_template` (and the BOS/EOS token texts) from GGUF metadata.
    pub fn from_gguf(content: &Content) -> Result<Self, LoadTemplateError> {
        let source = match content.metadata.get(KEY_CHAT_TEMPLATE) {
            Some(GgufValue::String(source)) => source.clone(),
            Some(_) => return Err(LoadTemplateError::TemplateNotString),
            None => return Err(LoadTemplateError::MissingTemplate),
        };
        let token_text = |key: &str| special_token_text(content, key).unwrap_or_default();
        Self::new(source, token_text(KEY_BOS), token_text(KEY_EOS))
    }

    /// Compiles `source`; `bos_token` / `eos_token` are the texts the template sees under those
    /// names.
    pub fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, LoadTemplateError> {
        let digest = blake3::hash(source.as_bytes()).to_hex().to_string();
        let mut environment = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|source| LoadTemplateError::Compile { source })?;
        environment.set_syntax(syntax);
        environment
            .set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", raise_exception);
        environment
            .add_template_owned(TEMPLATE_NAME, source)
            .map_err(|source| LoadTemplateError::Compile { source })?;
        Ok(Self {
            environment,
            bos_token,
            eos_token,
            digest,
        })
    }

    /// The prompt text of `messages`; with `add_generation_prompt` it ends with the header of
    /// the assistant's reply.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, RenderTemplateError> {
        let template = self
            .environment
            .get_template(TEMPLATE_NAME)
            .map_err(|source| RenderTemplateError { source })?;
        let messages: Vec<Value> = messages.iter().map(message_value).collect();
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|source| RenderTemplateError { source })
    }

    /// Hex BLAKE3 of the template source.
    pub fn digest(&self) -> String {
        self.digest.clone()
    }
}

fn message_value(message: &ChatMessage) -> Value {
    let fields: BTreeMap<String, Value> = [
        ("role".to_owned(), Value::from(message.role.as_str())),
        ("content".to_owned(), Value::from(message.content.as_str())),
    ]
    .into_iter()
    .collect();
    Value::from_object(fields)
}

/// `raise_exception(message)`, which Hugging Face templates call to reject a conversation.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// The text of the token whose id is stored under `id_key`, if the metadata has both.
fn special_token_text(content: &Content, id_key: &str) -> Option<String> {
    let id = content.metadata.get(id_key)?.to_u64().ok()?;
    let GgufValue::Array(tokens) = content.metadata.get(KEY_TOKENS)? else {
        return None;
    };
    match tokens.get(usize::try_from(id).ok()?)? {
        GgufValue::String(text) => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.to_owned(), "<s>".to_owned(), "</s>".to_owned())
            .expect("test template compiles")
    }

    #[test]
    fn renders_chatml_with_and_without_generation_prompt() {
        let messages = [ChatMessage::new("user", "Hi")];
        let chatml = template(CHATML);
        assert_eq!(
            chatml.render(&messages, true).expect("renders"),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            chatml.render(&messages, false).expect("renders"),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_special_tokens_are_available() {
        let source = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}{% endfor %}{{ eos_token }}";
        let rendered = template(source)
            .render(&[ChatMessage::new("user", "  hello ")], false)
            .expect("renders");
        assert_eq!(rendered, "<s>HELLO</s>");
    }

    #[test]
    fn block_tags_are_trimmed_like_transformers() {
        let source = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}";
        let rendered = template(source)
            .render(
                &[ChatMessage::new("user", "a"), ChatMessage::new("user", "b")],
                false,
            )
            .expect("renders");
        assert_eq!(rendered, "[a]\n[b]\n");
    }

    #[test]
    fn raise_exception_becomes_a_render_error_with_its_message() {
        let source = "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok";
        let chat = template(source);
        assert_eq!(
            chat.render(&[ChatMessage::new("user", "x")], false)
                .expect("renders"),
            "ok"
        );
        let error = chat
            .render(&[ChatMessage::new("assistant", "x")], false)
            .expect_err("must fail");
        assert!(
            error
                .to_string()
                .contains("first message must be from the user"),
            "{error}"
        );
    }

    #[test]
    fn syntax_error_is_a_compile_error() {
        let error = ChatTemplate::new(
            "{% for m in messages %}".to_owned(),
            String::new(),
            String::new(),
        )
        .expect_err("unclosed block must not compile");
        assert!(
            matches!(error, LoadTemplateError::Compile { .. }),
            "{error}"
        );
    }

    #[test]
    fn missing_template_metadata_is_reported() {
        let content = Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: Default::default(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        assert!(matches!(
            ChatTemplate::from_gguf(&content),
            Err(LoadTemplateError::MissingTemplate)
        ));
    }

    #[test]
    fn digest_depends_on_the_source() {
        assert_eq!(template(CHATML).digest(), template(CHATML).digest());
        assert_ne!(
            template(CHATML).digest(),
            template("{{ messages }}").digest()
        );
    }
}
