//! Arrow schemas and Parquet files for what people query later: one file per window,
//! readable by pyarrow, DuckDB or polars. Schemas are documented in `schemas/tables.md`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, StringArray, TimestampMillisecondArray, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// One ledger row: what the aggregator saw of one registered miner in one window.
#[derive(Clone, Debug, PartialEq)]
pub struct LedgerRow {
    pub window: u64,
    pub peer: String,
    pub found: bool,
    pub bytes: Option<u64>,
    pub last_modified_ms: Option<i64>,
    /// `accepted`, `rejected`, `missing` or `error` (the store failed; not the miner's verdict).
    pub verdict: String,
    /// Stable reason code (`""` when accepted as is).
    pub reason: String,
    pub detail: String,
    pub norm: Option<f64>,
    pub weight: f64,
}

pub fn ledger_schema() -> Schema {
    Schema::new(vec![
        Field::new("window", DataType::UInt64, false),
        Field::new("peer", DataType::Utf8, false),
        Field::new("found", DataType::Boolean, false),
        Field::new("bytes", DataType::UInt64, true),
        Field::new(
            "last_modified",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            true,
        ),
        Field::new("verdict", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("detail", DataType::Utf8, false),
        Field::new("norm", DataType::Float64, true),
        Field::new("weight", DataType::Float64, false),
    ])
}

/// The ledger as Parquet bytes (zstd-compressed columns; deterministic for equal rows).
pub fn ledger_parquet(rows: &[LedgerRow]) -> Result<Vec<u8>, parquet::errors::ParquetError> {
    let schema = Arc::new(ledger_schema());
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.window))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.peer.as_str()),
        )),
        Arc::new(BooleanArray::from(
            rows.iter().map(|r| r.found).collect::<Vec<_>>(),
        )),
        Arc::new(UInt64Array::from(
            rows.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        )),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.last_modified_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.verdict.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.detail.as_str()),
        )),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.norm).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.weight),
        )),
    ];
    let batch = RecordBatch::try_new(Arc::clone(&schema), cols)
        .map_err(|e| parquet::errors::ParquetError::General(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_created_by("shardrop".to_string())
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema, Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(out)
}

/// Reads a ledger back (for `shardrop` commands and tests).
pub fn read_ledger(bytes: bytes::Bytes) -> Result<Vec<LedgerRow>, parquet::errors::ParquetError> {
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Float64Type, TimestampMillisecondType, UInt64Type};
    let reader =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| parquet::errors::ParquetError::General(e.to_string()))?;
        let col = |name: &str| {
            b.column_by_name(name)
                .cloned()
                .ok_or_else(|| parquet::errors::ParquetError::General(format!("no column {name}")))
        };
        let (window, peer, found, bytes_c, lm, verdict, reason, detail, norm, weight) = (
            col("window")?,
            col("peer")?,
            col("found")?,
            col("bytes")?,
            col("last_modified")?,
            col("verdict")?,
            col("reason")?,
            col("detail")?,
            col("norm")?,
            col("weight")?,
        );
        for i in 0..b.num_rows() {
            let bytes_a = bytes_c.as_primitive::<UInt64Type>();
            let lm_a = lm.as_primitive::<TimestampMillisecondType>();
            let norm_a = norm.as_primitive::<Float64Type>();
            rows.push(LedgerRow {
                window: window.as_primitive::<UInt64Type>().value(i),
                peer: peer.as_string::<i32>().value(i).to_string(),
                found: found.as_boolean().value(i),
                bytes: bytes_a.is_valid(i).then(|| bytes_a.value(i)),
                last_modified_ms: lm_a.is_valid(i).then(|| lm_a.value(i)),
                verdict: verdict.as_string::<i32>().value(i).to_string(),
                reason: reason.as_string::<i32>().value(i).to_string(),
                detail: detail.as_string::<i32>().value(i).to_string(),
                norm: norm_a.is_valid(i).then(|| norm_a.value(i)),
                weight: weight.as_primitive::<Float64Type>().value(i),
            });
        }
    }
    Ok(rows)
}
