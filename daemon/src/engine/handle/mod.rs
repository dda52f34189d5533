//! The engine thread and its public API, used by the HTTP server and the skills manager.
//!
//! [`Engine::start`] spawns one thread that owns the scheduler (KV pool, prefix cache,
//! sequences). Callers talk to it through an [`EngineHandle`] (`Clone + Send + Sync`) over a
//! bounded command channel; each generation streams its events back through its own bounded
//! channel, sized for every event the request can produce so the engine never blocks on a slow
//! reader. A full waiting queue answers [`SubmitError::Overloaded`] at once. Dropping a
//! [`GenerationStream`] cancels the generation and frees its blocks.

mod types;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use skillkv_api::block_hash::{BLOCK_TOKENS, BlockHash};
use tokio::sync::{broadcast, mpsc, oneshot};

pub use self::types::*;
use crate::engine::kv_pool::KvPool;
use crate::engine::radix::CacheEvent;
use crate::engine::sampling::{Sampler, SamplingParams};
use crate::engine::scheduler::sequence::{Generation, Purpose, SeqId, Sequence};
use crate::engine::scheduler::text::TextState;
use crate::engine::scheduler::transfer::{ImportPrefixError, PrefixKv};
use crate::engine::scheduler::{ForwardModel, Scheduler, SchedulerLimits};
use crate::engine::stats::{EngineStats, KvStats};
use crate::engine::tokenizer::GgufTokenizer;

/// Control-command slots beyond the waiting-queue bound.
const CONTROL_COMMAND_SLOTS: usize = 64;

/// A message to the engine thread.
#[derive(Debug)]
enum Command {
    Enqueue(Box<Sequence>),
    Cancel(SeqId),
    Unpin(PinId, oneshot::Sender<Result<(), UnpinError>>),
    Stats(oneshot::Sender<EngineStats>),
    ExportPin(PinId, oneshot::Sender<Option<PrefixKv>>),
    ImportPinned(
        Box<(BlockHash, Vec<u32>, PrefixKv)>,
        oneshot::Sender<Result<PinnedPrefix, ImportPrefixError>>,
    ),
    Shutdown(oneshot::Sender<()>),
}

/// Starts engines.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Spawns the engine thread for `model`. With a tokenizer, token events carry text and stop
    /// strings end generation; without one, text is empty and stop strings are ignored.
    pub fn start<M: ForwardModel>(
        model: Arc<M>,
        tokenizer: Option<Arc<GgufTokenizer>>,
        config: EngineConfig,
    ) -> Result<EngineHandle, StartEngineError> {
        let num_blocks = validate_config(&config, &*model)?;
        let (commands, receiver) = mpsc::channel(config.max_waiting + CONTROL_COMMAND_SLOTS);
        let (cache_events, _) = broadcast::channel(config.cache_event_capacity);
        let waiting_new = Arc::new(AtomicUsize::new(0));
        let limits = SchedulerLimits {
            max_batch_tokens: config.max_batch_tokens,
            max_seqs: config.max_seqs,
            reuse_prefixes: config.reuse_prefixes,
        };
        let eos = tokenizer.as_ref().map(|tokenizer| tokenizer.eos_token_id());
        let model_config = model.config().clone();
        let kv = model
            .new_pool(num_blocks)
            .map_err(|source| StartEngineError::AllocateKvPool {
                num_blocks,
                source: Box::new(source),
            })?;
        let scheduler = Scheduler::new(
            model,
            limits,
            kv,
            eos,
            waiting_new.clone(),
            cache_events.clone(),
        );
        std::thread::Builder::new()
            .name("skillkv-engine".to_string())
            .spawn(move || run_engine(scheduler, receiver))
            .map_err(StartEngineError::SpawnThread)?;
        tracing::info!(
            num_blocks,
            max_batch_tokens = config.max_batch_tokens,
            max_seqs = config.max_seqs,
            max_waiting = config.max_waiting,
            "engine started"
        );
        Ok(EngineHandle {
            shared: Arc::new(Shared {
                commands,
                waiting_new,
                next_seq: AtomicU64::new(0),
                vocab: model_config.vocab,
                context_length: model_config.context_length,
                config,
                tokenizer,
                cache_events,
            }),
        })
    }
}

/// Most blocks a pool may have: every flat slot (`block * 16 + slot`) fits a u32.
const MAX_BLOCKS: usize = (1 << 32) / BLOCK_TOKENS;

/// Checks the config and returns the pool size in blocks.
fn validate_config<M: ForwardModel>(
    config: &EngineConfig,
    model: &M,
) -> Result<usize, StartEngineError> {
    let invalid = |field, problem: &str| StartEngineError::InvalidConfig {
        field,
        problem: problem.to_string(),
    };
    if config.max_seqs == 0 {
        return Err(invalid("max_seqs", "must be at least 1"));
    }
    if config.max_batch_tokens < config.max_seqs {
        return Err(invalid("max_batch_tokens", "must be at least max_seqs"));
    }
    if config.cache_event_capacity == 0 {
        return Err(invalid("cache_event_capacity", "must be at least 1"));
    }
    let num_blocks = match config.kv_cache {
        KvCacheSize::Blocks(blocks) => blocks,
        KvCacheSize::Bytes(bytes) => bytes / KvPool::bytes_per_block(model.config()).max(1),
    };
    // Block ids are u32, and so are flat slots (`block * 16 + slot`) on a device.
    if num_blocks == 0 || num_blocks > MAX_BLOCKS {
        return Err(invalid("kv_cache", "must give between 1 and 2^28 blocks"));
    }
    Ok(num_blocks)
}

#[derive(Debug)]
struct Shared {
    commands: mpsc::Sender<Command>,
    waiting_new: Arc<AtomicUsize>,
    next_seq: AtomicU64,
    vocab: usize,
    context_length: usize,
    config: EngineConfig,
    tokenizer: Option<Arc<GgufTokenizer>>,
    cache_events: broadcast::Sender<CacheEvent>,
}

/// The engine's API; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Whether `max_waiting` requests already wait, so that [`Self::submit`] would answer
    /// [`SubmitError::Overloaded`] now.
    pub fn waiting_is_full(&self) -> bool {
        self.shared.waiting_new.load(Ordering::Acquire) >= self.shared.config.max_waiting
    }

    /// Queues a generation. Answers at once: [`SubmitError::Overloaded`] when `max_waiting`
    /// requests already wait.
    pub fn submit(&self, request: GenerateRequest) -> Result<GenerationStream, SubmitError> {
        self.submit_assembled(request, Vec::new())
    }

    /// Queues a generation whose prompt segments `modular` may be served from their own
    /// independently prefilled KV (modular skill assembly, see [`ModularSpan`]). Spans that
    /// overlap an earlier one or reach past the prompt are ignored (with a warning): they only
    /// ever save work, so the prompt is then computed instead.
    pub fn submit_assembled(
        &self,
        request: GenerateRequest,
        modular: Vec<ModularSpan>,
    ) -> Result<GenerationStream, SubmitError> {
        self.validate(&request.prompt_tokens, Some(&request.sampling))?;
        let modular = usable_spans(modular, request.prompt_tokens.len());
        let max_waiting = self.shared.config.max_waiting;
        self.shared
            .waiting_new
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < max_waiting).then_some(waiting + 1)
            })
            .map_err(|_| SubmitError::Overloaded { max_waiting })?;
        // Started + one per token + Finished/Failed, with one to spare.
        let (events, receiver) = mpsc::channel(request.sampling.max_tokens + 3);
        let text = self
            .shared
            .tokenizer
            .as_ref()
            .map(|tokenizer| TextState::new(tokenizer.clone(), &request.sampling.stop));
        let generation = Generation {
            sampler: Sampler::new(&request.sampling),
            params: request.sampling,
            text,
            events,
        };
        let seq = self.new_sequence(
            request.request_id,
            request.prompt_tokens,
            request.adapter,
            Purpose::Generate(Box::new(generation)),
            true,
        );
        let seq = Sequence { modular, ..seq };
        let id = seq.id;
        match self
            .shared
            .commands
            .try_send(Command::Enqueue(Box::new(seq)))
        {
            Ok(()) => Ok(GenerationStream {
                id,
                events: receiver,
                commands: self.shared.commands.clone(),
                ended: false,
            }),
            Err(error) => {
                self.shared.waiting_new.fetch_sub(1, Ordering::AcqRel);
                Err(match error {
                    mpsc::error::TrySendError::Full(_) => SubmitError::Overloaded { max_waiting },
                    mpsc::error::TrySendError::Closed(_) => SubmitError::EngineStopped,
                })
            }
        }
    }

    /// Prefills `request.tokens` (reusing whatever is cached) and pins its full blocks so they
    /// are never evicted, until [`Self::unpin`].
    pub async fn pin(&self, request: PinRequest) -> Result<PinnedPrefix, PinError> {
        self.prefill_prefix("pin", request, |reply| Purpose::Pin(Some(reply)))
            .await
    }

    /// Prefills the full blocks of `request.tokens` into the prefix cache (reusing whatever is
    /// cached), without pinning them: they stay until evicted, least recently used first. The
    /// tokens of a last partial block are not computed.
    pub async fn cache_prefix(&self, mut request: PinRequest) -> Result<CachedPrefix, PinError> {
        let full = request.tokens.len() / BLOCK_TOKENS * BLOCK_TOKENS;
        request.tokens.truncate(full);
        self.prefill_prefix("cache", request, |reply| Purpose::Cache(Some(reply)))
            .await
    }

    /// Queues a prefill-only sequence for `request` with the purpose `purpose` makes of its
    /// reply channel, and awaits the reply.
    async fn prefill_prefix<T>(
        &self,
        label: &str,
        request: PinRequest,
        purpose: impl FnOnce(oneshot::Sender<Result<T, PinError>>) -> Purpose,
    ) -> Result<T, PinError> {
        self.validate(&request.tokens, None)?;
        let (reply, answer) = oneshot::channel();
        let seq = self.new_sequence(
            label.to_string(),
            request.tokens,
            request.adapter,
            purpose(reply),
            false,
        );
        self.send(Command::Enqueue(Box::new(seq)))
            .await
            .map_err(|()| PinError::EngineStopped)?;
        answer.await.map_err(|_| PinError::EngineStopped)?
    }

    /// Removes a pin; its blocks stay cached but become evictable.
    pub async fn unpin(&self, id: PinId) -> Result<(), UnpinError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Unpin(id, reply))
            .await
            .map_err(|()| UnpinError::EngineStopped)?;
        answer.await.map_err(|_| UnpinError::EngineStopped)?
    }

    /// The KV of pin `id`'s blocks (for the node's skill store); `None` for an unknown pin or a
    /// stopped engine.
    pub async fn export_pin(&self, id: PinId) -> Option<PrefixKv> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::ExportPin(id, reply)).await.ok()?;
        answer.await.ok().flatten()
    }

    /// Brings stored KV for the full blocks of `tokens` into the pool and pins it, instead of
    /// prefilling. The caller vouches that `kv` was computed by this model for these tokens.
    pub async fn import_pinned(
        &self,
        tokens: Vec<u32>,
        adapter: Option<&str>,
        kv: PrefixKv,
    ) -> Result<PinnedPrefix, ImportPrefixError> {
        self.validate(&tokens, None)
            .map_err(|error| ImportPrefixError::Shape(error.to_string()))?;
        let root = self.namespace_root(adapter);
        let (reply, answer) = oneshot::channel();
        self.send(Command::ImportPinned(Box::new((root, tokens, kv)), reply))
            .await
            .map_err(|()| ImportPrefixError::EngineStopped)?;
        answer.await.map_err(|_| ImportPrefixError::EngineStopped)?
    }

    /// Queue figures and KV accounting, after every command sent before this call.
    pub async fn stats(&self) -> Option<EngineStats> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Stats(reply)).await.ok()?;
        answer.await.ok()
    }

    /// KV accounting (see [`KvStats`]); `None` when the engine is stopped.
    pub async fn kv_stats(&self) -> Option<KvStats> {
        self.stats().await.map(|stats| stats.kv)
    }

    /// Prefix-block stored/evicted events from now on. A subscriber that falls more than
    /// `cache_event_capacity` events behind misses the oldest ones (and is told so).
    pub fn subscribe_cache_events(&self) -> broadcast::Receiver<CacheEvent> {
        self.shared.cache_events.subscribe()
    }

    /// The hash the prefix blocks of `adapter` (or of the base model) chain from.
    pub fn namespace_root(&self, adapter: Option<&str>) -> BlockHash {
        let mut namespace = self.shared.config.cache_namespace.clone();
        namespace.adapter_id = adapter.map(str::to_owned);
        namespace.root()
    }

    /// The engine's configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Stops the engine: running and waiting sequences fail with
    /// [`GenerateError::EngineShutDown`]; returns once the thread has released everything.
    pub async fn shutdown(&self) {
        let (reply, answer) = oneshot::channel();
        if self.send(Command::Shutdown(reply)).await.is_ok() {
            let _ = answer.await;
        }
    }

    async fn send(&self, command: Command) -> Result<(), ()> {
        self.shared.commands.send(command).await.map_err(|_| ())
    }

    fn validate(
        &self,
        tokens: &[u32],
        sampling: Option<&SamplingParams>,
    ) -> Result<(), ValidateRequestError> {
        if tokens.is_empty() {
            return Err(ValidateRequestError::EmptyPrompt);
        }
        let vocab = self.shared.vocab;
        if let Some(&token) = tokens.iter().find(|&&token| token as usize >= vocab) {
            return Err(ValidateRequestError::TokenOutOfVocabulary { token, vocab });
        }
        let max_tokens = match sampling {
            Some(sampling) => {
                sampling.validate()?;
                sampling.max_tokens
            }
            None => 0,
        };
        let context_length = self.shared.context_length;
        if tokens.len() + max_tokens > context_length {
            return Err(ValidateRequestError::ContextTooLong {
                prompt: tokens.len(),
                max_tokens,
                context_length,
            });
        }
        Ok(())
    }

    fn new_sequence(
        &self,
        request_id: String,
        tokens: Vec<u32>,
        adapter: Option<String>,
        purpose: Purpose,
        holds_waiting_slot: bool,
    ) -> Sequence {
        Sequence::new(
            self.shared.next_seq.fetch_add(1, Ordering::Relaxed),
            request_id,
            tokens,
            self.namespace_root(adapter.as_deref()),
            purpose,
            holds_waiting_slot,
        )
    }
}

/// The spans that are in order, disjoint and inside a prompt of `prompt_len` tokens.
fn usable_spans(spans: Vec<ModularSpan>, prompt_len: usize) -> Vec<ModularSpan> {
    let mut end = 0;
    spans
        .into_iter()
        .filter(|span| {
            let fits = span.start >= end
                && span
                    .start
                    .checked_add(span.len)
                    .is_some_and(|span_end| span_end <= prompt_len);
            if fits {
                end = span.start + span.len;
            } else {
                tracing::warn!(
                    ?span,
                    prompt_len,
                    "ignoring a modular span outside the prompt"
                );
            }
            fits
        })
        .collect()
}

/// The events of one generation. Dropping it (or calling [`Self::cancel`]) cancels the
/// generation and frees its KV blocks.
#[derive(Debug)]
pub struct GenerationStream {
    id: SeqId,
    events: mpsc::Receiver<GenerationEvent>,
    commands: mpsc::Sender<Command>,
    ended: bool,
}

impl GenerationStream {
    /// The next event; `None` after the last one.
    pub async fn recv(&mut self) -> Option<GenerationEvent> {
        let event = self.events.recv().await;
        self.note(event.as_ref());
        event
    }

    /// The next event, blocking the current (non-async) thread.
    pub fn blocking_recv(&mut self) -> Option<GenerationEvent> {
        let event = self.events.blocking_recv();
        self.note(event.as_ref());
        event
    }

    /// Cancels the generation; a `Finished { reason: Cancelled }` follows unless it already
    /// ended.
    pub fn cancel(&mut self) {
        if !self.ended {
            let _ = self.commands.try_send(Command::Cancel(self.id));
        }
    }

    fn note(&mut self, event: Option<&GenerationEvent>) {
        if matches!(
            event,
            None | Some(GenerationEvent::Finished { .. } | GenerationEvent::Failed(_))
        ) {
            self.ended = true;
        }
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        // If the command does not fit, the engine still notices the closed channel next step.
        self.cancel();
    }
}

/// The engine thread's loop: apply commands, step, and sleep on the channel when idle.
fn run_engine<M: ForwardModel>(mut scheduler: Scheduler<M>, mut commands: mpsc::Receiver<Command>) {
    loop {
        if scheduler.is_idle() {
            match commands.blocking_recv() {
                Some(command) => {
                    if !apply_command(&mut scheduler, command) {
                        return;
                    }
                }
                None => break,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(command) => {
                    if !apply_command(&mut scheduler, command) {
                        return;
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if scheduler.is_idle() {
                        tracing::info!("every engine handle dropped; engine thread exits");
                        return;
                    }
                    break;
                }
            }
        }
        scheduler.step();
    }
    tracing::info!("every engine handle dropped; engine thread exits");
}

/// Applies one command; false when the engine must stop.
fn apply_command<M: ForwardModel>(scheduler: &mut Scheduler<M>, command: Command) -> bool {
    match command {
        Command::Enqueue(seq) => scheduler.enqueue(*seq),
        Command::Cancel(id) => scheduler.cancel(id),
        Command::Unpin(id, reply) => {
            let result = if scheduler.unpin(id.0) {
                Ok(())
            } else {
                Err(UnpinError::UnknownPin(id))
            };
            let _ = reply.send(result);
        }
        Command::Stats(reply) => {
            let _ = reply.send(scheduler.stats());
        }
        Command::ExportPin(id, reply) => {
            let exported = scheduler.export_pin(id).unwrap_or_else(|error| {
                tracing::warn!(
                    pin = id.0,
                    error = %error,
                    cause = %error.source,
                    "could not read a pinned prefix's KV out of the pool"
                );
                None
            });
            let _ = reply.send(exported);
        }
        Command::ImportPinned(request, reply) => {
            let (root, tokens, kv) = *request;
            let _ = reply.send(scheduler.import_pinned(root, &tokens, &kv));
        }
        Command::Shutdown(ack) => {
            scheduler.shut_down();
            tracing::info!("engine shut down");
            let _ = ack.send(());
            return false;
        }
    }
    true
}
