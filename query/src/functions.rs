//! Scalar functions cloudtap adds to SQL, for questions about captured bytes.
//!
//! - `payload_text(binary) -> utf8`: the bytes as text, invalid UTF-8 replaced with
//!   U+FFFD (so `payload_text(payload) LIKE '%needle%'` searches frames and bodies).
//! - `header(headers, name) -> utf8`: the first value of a header in a
//!   `request_headers` / `response_headers` list, by case-insensitive name, or NULL.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, GenericBinaryArray, OffsetSizeTrait, StringBuilder,
};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, TypeSignature,
    Volatility,
};
use datafusion::prelude::SessionContext;

/// Registers every cloudtap function on `ctx`.
pub fn register(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::from(PayloadText::new()));
    ctx.register_udf(ScalarUDF::from(Header::new()));
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PayloadText {
    signature: Signature,
}

impl PayloadText {
    fn new() -> Self {
        Self {
            signature: Signature::one_of(
                vec![
                    TypeSignature::Exact(vec![DataType::Binary]),
                    TypeSignature::Exact(vec![DataType::LargeBinary]),
                    TypeSignature::Exact(vec![DataType::BinaryView]),
                    TypeSignature::Exact(vec![DataType::Utf8]),
                ],
                Volatility::Immutable,
            ),
        }
    }
}

fn lossy<O: OffsetSizeTrait>(a: &GenericBinaryArray<O>) -> ArrayRef {
    let mut b = StringBuilder::with_capacity(a.len(), a.value_data().len());
    for v in a.iter() {
        match v {
            Some(bytes) => b.append_value(String::from_utf8_lossy(bytes)),
            None => b.append_null(),
        }
    }
    Arc::new(b.finish())
}

impl ScalarUDFImpl for PayloadText {
    fn name(&self) -> &str {
        "payload_text"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [arg] = args.args.as_slice() else {
            return exec_err!("payload_text takes one argument: payload_text(payload)");
        };
        match arg {
            ColumnarValue::Scalar(v) => {
                let text = match v {
                    ScalarValue::Binary(b)
                    | ScalarValue::LargeBinary(b)
                    | ScalarValue::BinaryView(b) => {
                        b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
                    }
                    ScalarValue::Utf8(s) => s.clone(),
                    other => {
                        return exec_err!("payload_text takes bytes, not {}", other.data_type());
                    }
                };
                Ok(ColumnarValue::Scalar(ScalarValue::Utf8(text)))
            }
            ColumnarValue::Array(a) => {
                let out: ArrayRef = match a.data_type() {
                    DataType::Binary => lossy(a.as_binary::<i32>()),
                    DataType::LargeBinary => lossy(a.as_binary::<i64>()),
                    DataType::BinaryView => {
                        let v = a.as_binary_view();
                        let mut b = StringBuilder::with_capacity(v.len(), 0);
                        for x in v.iter() {
                            match x {
                                Some(bytes) => b.append_value(String::from_utf8_lossy(bytes)),
                                None => b.append_null(),
                            }
                        }
                        Arc::new(b.finish())
                    }
                    DataType::Utf8 => a.clone(),
                    other => return exec_err!("payload_text takes bytes, not {other}"),
                };
                Ok(ColumnarValue::Array(out))
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Header {
    signature: Signature,
}

impl Header {
    fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Header {
    fn name(&self) -> &str {
        "header"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, args: &[DataType]) -> Result<DataType> {
        let headers_like =
            matches!(&args[0], DataType::List(f) if matches!(f.data_type(), DataType::Struct(_)));
        if !headers_like || !matches!(args[1], DataType::Utf8 | DataType::Utf8View) {
            return exec_err!(
                "header takes a header list and a name, e.g. header(request_headers, 'content-type')"
            );
        }
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let lists = arrays[0].as_list::<i32>();
        let names = datafusion::arrow::compute::cast(&arrays[1], &DataType::Utf8)?;
        let names = names.as_string::<i32>();
        let mut out = StringBuilder::with_capacity(rows, 0);
        for i in 0..rows {
            if lists.is_null(i) || names.is_null(i) {
                out.append_null();
                continue;
            }
            let wanted = names.value(i);
            let entries = lists.value(i);
            let entries = entries.as_struct();
            let (Some(n), Some(v)) = (
                entries.column_by_name("name"),
                entries.column_by_name("value"),
            ) else {
                return exec_err!("header: the list's entries have no name and value fields");
            };
            let (n, v) = (n.as_string::<i32>(), v.as_string::<i32>());
            match (0..n.len()).find(|&j| n.value(j).eq_ignore_ascii_case(wanted)) {
                Some(j) => out.append_value(v.value(j)),
                None => out.append_null(),
            }
        }
        let out: ArrayRef = Arc::new(out.finish());
        Ok(ColumnarValue::Array(out))
    }
}
