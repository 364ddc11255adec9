//! Guest values (MessagePack) as JSON for printing.

use serde_json::{Map, Number, Value as Json};

/// Converts a MessagePack value to JSON: binary becomes an array of bytes
/// (as a script blob prints), map keys become strings, non-finite floats
/// become strings.
pub fn to_json(value: &rmpv::Value) -> Json {
    use rmpv::Value as V;
    match value {
        V::Nil => Json::Null,
        V::Boolean(b) => Json::Bool(*b),
        V::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => Json::from(n),
            (None, Some(n)) => Json::from(n),
            _ => Json::Null,
        },
        V::F32(f) => float(f64::from(*f)),
        V::F64(f) => float(*f),
        V::String(s) => Json::String(
            s.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(s.as_bytes()).into_owned()),
        ),
        V::Binary(b) => Json::Array(b.iter().map(|&x| Json::from(x)).collect()),
        V::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        V::Map(entries) => {
            let mut map = Map::new();
            for (k, v) in entries {
                let key = match k {
                    V::String(s) => s.as_str().unwrap_or_default().to_string(),
                    other => to_json(other).to_string(),
                };
                map.insert(key, to_json(v));
            }
            Json::Object(map)
        }
        V::Ext(tag, data) => serde_json::json!({ "ext": tag, "data": data }),
    }
}

fn float(f: f64) -> Json {
    Number::from_f64(f)
        .map(Json::Number)
        .unwrap_or_else(|| Json::String(f.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_every_kind() {
        let v = rmpv::Value::Map(vec![
            ("a".into(), rmpv::Value::Binary(vec![1, 2])),
            ("b".into(), rmpv::Value::F64(f64::NAN)),
            (rmpv::Value::from(3), rmpv::Value::Nil),
        ]);
        assert_eq!(to_json(&v).to_string(), r#"{"3":null,"a":[1,2],"b":"NaN"}"#);
    }
}
