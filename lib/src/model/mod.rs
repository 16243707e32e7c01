//! The model engine: Llama-family decoders that load exactly, train correctly, carry LoRA
//! adapters and generate.
//!
//! * [`LlamaModel`]: one decoder for Llama 2/3.x (rope scaling), Mistral (sliding window),
//!   Qwen2 (qkv bias), SmolLM2 (tied embeddings), grouped-query attention. Full-sequence
//!   logits and a fused LM-head loss for training ([`LlamaModel::loss`]); an explicit
//!   [`KvCache`] for generation. Tensor names are Hugging Face's.
//! * Loading: [`LlamaModel::load`] / [`Model::load`] take a Hugging Face directory, a GGUF file,
//!   or a Hugging Face id in the local cache; [`LlamaModel::save_pretrained`] writes HF layout.
//! * [`ops`]: every op on the training path with a correct backward (fused CPU kernels).
//! * LoRA: [`LlamaModel::add_lora`], [`LlamaModel::merge_lora`], PEFT-format
//!   [`LlamaModel::save_lora`] / [`LlamaModel::load_lora`].
//! * Generation: [`LlamaModel::stream_ids`] (token ids), [`Model::generate`] / [`Model::chat`]
//!   (text through the model's [`crate::tokenize::Tokenizer`], the one training uses).
//!
//! ```no_run
//! use tunebook::model::Model;
//! use tunebook::tokenize::Message;
//! let model = Model::load("HuggingFaceTB/SmolLM2-135M-Instruct")?;
//! println!("{}", model.chat(&[Message::user("What is the capital of France?")])?);
//! # anyhow::Ok(())
//! ```

pub mod batch;
pub mod config;
pub mod generate;
pub mod io;
pub mod llama;
pub mod loglik;
pub mod lora;
pub mod ops;
pub mod tiny;

pub use batch::{AdapterWeights, SeqStep};
pub use config::{LlamaConfig, RopeScaling};
pub use generate::{
    FinishReason, Generation, GenerateArgs, GenerationConfig, Model, Sampler, TextStream, TokenStream, default_device, run_generate_cli,
};
pub use io::{ModelSource, TensorData, hf_cache_dir, resolve_model, write_safetensors, write_safetensors_data};
pub use llama::{DecoderLayer, KvCache, Linear, LlamaModel, LossTape, Packing};
pub use loglik::{ContinuationScore, token_logprob};
pub use lora::{ALL_TARGETS, LoraAdapter, Lora};
pub use ops::IGNORE_INDEX;
pub use tiny::write_tiny_model;

#[cfg(test)]
mod layout_tests;
#[cfg(test)]
mod tests;
