//! Moving columns between arrow-rs (deltalake) and polars-arrow without copies,
//! through the Arrow C Data Interface.
//!
//! Both crates implement the same C ABI (`ArrowArray`, `ArrowSchema` are
//! `#[repr(C)]` structs defined by the Arrow specification), so an array
//! exported by one is imported by the other; ownership of the buffers moves
//! with the release callback.

use super::DataError;
use deltalake::arrow::array::{Array, ArrayRef as RsArrayRef, RecordBatch, make_array};
use deltalake::arrow::datatypes::{DataType as RsType, Field as RsField, Schema as RsSchema};
use deltalake::arrow::ffi::{FFI_ArrowArray, FFI_ArrowSchema, from_ffi, to_ffi};
use polars::prelude::*;
use std::sync::Arc;

fn ffi_err(e: impl std::fmt::Display) -> DataError {
    DataError::Arrow(e.to_string())
}

/// One arrow-rs record batch as a polars DataFrame (columns keep their names).
pub(crate) fn batch_to_df(batch: &RecordBatch) -> Result<DataFrame, DataError> {
    let schema = batch.schema();
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, array) in schema.fields().iter().zip(batch.columns()) {
        let (ffi_array, ffi_schema) = to_ffi(&array.to_data()).map_err(ffi_err)?;
        // SAFETY: both structs follow the Arrow C Data Interface layout. The
        // array's ownership (its release callback) moves to polars: the
        // arrow-rs wrapper is forgotten so it does not release it as well.
        let series = unsafe {
            let pl_schema = &*(&ffi_schema as *const FFI_ArrowSchema as *const polars_arrow::ffi::ArrowSchema);
            let pl_field = polars_arrow::ffi::import_field_from_c(pl_schema).map_err(ffi_err)?;
            let raw = std::ptr::read(&ffi_array as *const FFI_ArrowArray as *const polars_arrow::ffi::ArrowArray);
            std::mem::forget(ffi_array);
            let arr = polars_arrow::ffi::import_array_from_c(raw, pl_field.dtype.clone()).map_err(ffi_err)?;
            let pl_field = polars_arrow::datatypes::Field::new(field.name().as_str().into(), pl_field.dtype, true);
            Series::try_from((&pl_field, arr)).map_err(ffi_err)?
        };
        columns.push(series.into_column());
    }
    DataFrame::new(batch.num_rows(), columns).map_err(ffi_err)
}

/// Delta stores strings as `Utf8` and lists as `List`; polars emits views and
/// large offsets. The arrow-rs type a polars column should be written as.
pub(crate) fn delta_friendly(t: &RsType) -> RsType {
    match t {
        RsType::LargeUtf8 | RsType::Utf8View => RsType::Utf8,
        RsType::LargeBinary | RsType::BinaryView => RsType::Binary,
        RsType::LargeList(f) | RsType::ListView(f) | RsType::LargeListView(f) | RsType::List(f) => {
            RsType::List(Arc::new(RsField::new(f.name(), delta_friendly(f.data_type()), true)))
        }
        RsType::Struct(fields) => RsType::Struct(
            fields.iter().map(|f| Arc::new(RsField::new(f.name(), delta_friendly(f.data_type()), true))).collect(),
        ),
        RsType::Dictionary(_, v) => delta_friendly(v),
        RsType::UInt64 => RsType::Int64,
        RsType::UInt32 => RsType::Int64,
        RsType::UInt16 => RsType::Int32,
        RsType::UInt8 => RsType::Int16,
        other => other.clone(),
    }
}

/// A polars DataFrame as one arrow-rs record batch with Delta-compatible types
/// (every field nullable).
pub(crate) fn df_to_batch(df: &DataFrame) -> Result<RecordBatch, DataError> {
    let mut fields = Vec::with_capacity(df.width());
    let mut arrays: Vec<RsArrayRef> = Vec::with_capacity(df.width());
    for column in df.columns() {
        let series = column.as_materialized_series().rechunk();
        let pl_field = series.field().to_arrow(CompatLevel::oldest());
        let chunk = series.to_arrow(0, CompatLevel::oldest());
        let ffi_schema = polars_arrow::ffi::export_field_to_c(&pl_field);
        let ffi_array = polars_arrow::ffi::export_array_to_c(chunk);
        // SAFETY: same ABI as above; ownership of the exported array moves to arrow-rs.
        let data = unsafe {
            let rs_schema = &*(&ffi_schema as *const polars_arrow::ffi::ArrowSchema as *const FFI_ArrowSchema);
            let raw = std::ptr::read(&ffi_array as *const polars_arrow::ffi::ArrowArray as *const FFI_ArrowArray);
            std::mem::forget(ffi_array);
            from_ffi(raw, rs_schema).map_err(ffi_err)?
        };
        let array = make_array(data);
        let target = delta_friendly(array.data_type());
        let array = if &target == array.data_type() {
            array
        } else {
            deltalake::arrow::compute::cast(&array, &target).map_err(|e| {
                DataError::Arrow(format!("column `{}` cannot be stored in Delta as {target}: {e}", column.name()))
            })?
        };
        fields.push(RsField::new(column.name().as_str(), target, true));
        arrays.push(array);
    }
    let schema = Arc::new(RsSchema::new(fields));
    let opts = deltalake::arrow::array::RecordBatchOptions::new().with_row_count(Some(df.height()));
    RecordBatch::try_new_with_options(schema, arrays, &opts).map_err(ffi_err)
}
