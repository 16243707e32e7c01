//! # tunebook
//!
//! Fine-tune your own LLMs from a notebook, on your own hardware: explore data with
//! polars, fine-tune Llama-family models with candle, track runs in MLflow,
//! register models and query or serve them. See `ARCHITECTURE.md` for the map.
//!
//! In the tunebook Jupyter kernel everything in [`prelude`] is already imported.

pub mod data;
pub mod display;
pub mod dist;
pub mod eval;
pub mod export;
pub mod files;
pub mod interrupt;
pub mod mlflow;
pub mod model;
pub mod registry;
pub mod runs;
pub mod serve;
pub mod tokenize;
pub mod track;
pub mod train;

#[cfg(test)]
mod module_graph;

/// The library version, as logged in run tags.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Everything a notebook cell needs, imported by the kernel with
/// `use tunebook::prelude::*;`.
pub mod prelude {
    pub use crate::display::{
        self, DataFrameExt, EvcxrDebugDisplay, EvcxrDisplay, Html, Line, LinePlot, MimeBundle, ProgressBar, Render, Table, input, live, show,
    };
    pub use crate::data::{
        ChatLoss, Columns, Dataset, DeltaVersion, PackOptions, PrepareOptions, Task, ValidationReport, WriteMode,
    };
    pub use crate::eval::{EvalResult, Evaluation, ExactMatch, Judge, Metric};
    pub use crate::export::{Export, Quant};
    pub use crate::interrupt;
    pub use crate::model::{
        GenerationConfig, LlamaConfig, LlamaModel, Lora, Model, Packing, default_device,
    };
    pub use crate::registry::Registry;
    pub use crate::serve::{Endpoint, Serve};
    pub use crate::tokenize::{Message, Tokenizer};
    pub use crate::mlflow::MlflowClient;
    pub use crate::train::{self, FineTune, Run, Status, TrainConfig};
    pub use polars::prelude::{DataFrame, IntoLazy, LazyFrame, col, df, lit};
    pub use polars;
}

/// A short description of this build: version, compute devices available, and how
/// many threads CPU kernels use. Shown by `tunebook info` and the first notebook.
pub fn info() -> display::Table {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cuda = if cfg!(feature = "cuda") { "compiled in" } else { "not compiled (build with --features cuda)" };
    display::Table::new(["item", "value"])
        .title("tunebook")
        .row(["version", VERSION])
        .row(["cpu threads".to_string(), threads.to_string()])
        .row(["cuda", cuda])
}
