//! The fields of a telemetry payload that a [`TelemetryReading`](super::TelemetryReading) is made
//! of, read straight from the JSON text.
//!
//! Reading a payload into a `serde_json::Value` first built a map with an owned key and value for
//! every field, then looked each one up: about a twentieth of `ecars up`'s CPU at 40,000
//! readings/s. [`ReadingFields`] keeps only the known fields, as scalars borrowed from the
//! payload where it can, and accepts exactly the payloads a `Value` would: the same deserializer
//! parses every value, other keys included (numbers out of range, bad escapes and trailing text
//! fail the same way), and a key given twice keeps its last value, as a `Value` map does.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// One field's value as the payload gave it. JSON `null` is not kept: a field that is `null` is
/// read as absent, as it always was.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Field<'a> {
    Bool(bool),
    Number(Number),
    Text(Cow<'a, str>),
    /// An array or an object, kept whole for the rejection's message (never valid here).
    Composite(Value),
}

impl Field<'_> {
    /// What JSON calls this kind of value, for rejections.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Field::Bool(_) => "boolean",
            Field::Number(_) => "number",
            Field::Text(_) => "string",
            Field::Composite(value) => super::json_kind(value),
        }
    }
}

/// Shown in rejections as the JSON text of the value.
impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Bool(b) => write!(f, "{b}"),
            Field::Number(n) => write!(f, "{n}"),
            Field::Text(text) => write!(f, "{}", Value::String(text.to_string())),
            Field::Composite(value) => write!(f, "{value}"),
        }
    }
}

/// The known fields of a telemetry payload, each `None` when absent or `null`.
#[derive(Debug, Default)]
pub(super) struct ReadingFields<'a> {
    pub(super) vin: Option<Field<'a>>,
    pub(super) name: Option<Field<'a>>,
    pub(super) profile: Option<Field<'a>>,
    pub(super) range: Option<Field<'a>>,
    pub(super) mpge: Option<Field<'a>>,
    pub(super) battery: Option<Field<'a>>,
    pub(super) malfunction: Option<Field<'a>>,
    pub(super) speed: Option<Field<'a>>,
    pub(super) latitude: Option<Field<'a>>,
    pub(super) longitude: Option<Field<'a>>,
    pub(super) date: Option<Field<'a>>,
}

impl<'a> ReadingFields<'a> {
    /// Reads a JSON object's known fields. Any other JSON (not JSON, not an object) is an
    /// error; the caller says precisely which with a `Value`, on that rare path only.
    pub(super) fn read(payload: &'a [u8]) -> Result<ReadingFields<'a>, serde_json::Error> {
        serde_json::from_slice(payload)
    }

    fn slot(&mut self, key: Key) -> Option<&mut Option<Field<'a>>> {
        Some(match key {
            Key::Vin => &mut self.vin,
            Key::Name => &mut self.name,
            Key::Profile => &mut self.profile,
            Key::Range => &mut self.range,
            Key::Mpge => &mut self.mpge,
            Key::Battery => &mut self.battery,
            Key::Malfunction => &mut self.malfunction,
            Key::Speed => &mut self.speed,
            Key::Latitude => &mut self.latitude,
            Key::Longitude => &mut self.longitude,
            Key::Date => &mut self.date,
            Key::Other => return None,
        })
    }
}

impl<'de> Deserialize<'de> for ReadingFields<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = ReadingFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = ReadingFields::default();
                while let Some(key) = map.next_key::<Key>()? {
                    // Every value is parsed, other keys' too, so what a `Value` refuses is
                    // refused here.
                    let value = map.next_value::<Nullable<'de>>()?.0;
                    if let Some(slot) = fields.slot(key) {
                        *slot = value;
                    }
                }
                Ok(fields)
            }
        }
        deserializer.deserialize_map(FieldsVisitor)
    }
}

/// A key of the payload object, compared without copying it.
#[derive(Debug, Clone, Copy)]
enum Key {
    Vin,
    Name,
    Profile,
    Range,
    Mpge,
    Battery,
    Malfunction,
    Speed,
    Latitude,
    Longitude,
    Date,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
                Ok(match key {
                    "vin" => Key::Vin,
                    "name" => Key::Name,
                    "profile" => Key::Profile,
                    "range" => Key::Range,
                    "mpge" => Key::Mpge,
                    "battery" => Key::Battery,
                    "malfunction" => Key::Malfunction,
                    "speed" => Key::Speed,
                    "latitude" => Key::Latitude,
                    "longitude" => Key::Longitude,
                    "date" => Key::Date,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Any JSON value, `null` as `None`.
struct Nullable<'a>(Option<Field<'a>>);

impl<'de> Deserialize<'de> for Nullable<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> Visitor<'de> for ValueVisitor {
            type Value = Nullable<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Nullable(None))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Nullable(None))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Self::Value, E> {
                Ok(Nullable(Some(Field::Bool(b))))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                Ok(Nullable(Some(Field::Number(n.into()))))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(Nullable(Some(Field::Number(n.into()))))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
                // JSON text has no infinities or NaN: serde_json refuses them before this.
                Number::from_f64(n)
                    .map(|n| Nullable(Some(Field::Number(n))))
                    .ok_or_else(|| E::custom("number out of range"))
            }
            fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
                Ok(Nullable(Some(Field::Text(Cow::Borrowed(text)))))
            }
            // A string with escapes cannot be borrowed from the payload.
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                Ok(Nullable(Some(Field::Text(Cow::Owned(text.to_owned())))))
            }
            fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
                Ok(Nullable(Some(Field::Text(Cow::Owned(text)))))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                let value = Value::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(Nullable(Some(Field::Composite(value))))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let value = Value::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Nullable(Some(Field::Composite(value))))
            }
        }
        deserializer.deserialize_any(ValueVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> ReadingFields<'_> {
        ReadingFields::read(json.as_bytes()).unwrap()
    }

    #[test]
    fn known_fields_are_borrowed_and_others_skipped() {
        let fields = read(
            r#"{"vin":"1HGCM82633A004352","battery":55.5,"speed":12,"malfunction":false,
                "extra":{"deep":[1,2,{"x":null}]},"name":null}"#,
        );
        assert!(matches!(
            fields.vin,
            Some(Field::Text(Cow::Borrowed("1HGCM82633A004352")))
        ));
        assert_eq!(
            fields.battery,
            Some(Field::Number(Number::from_f64(55.5).unwrap()))
        );
        assert_eq!(fields.speed, Some(Field::Number(12u64.into())));
        assert_eq!(fields.malfunction, Some(Field::Bool(false)));
        assert_eq!(fields.name, None);
        assert_eq!(fields.date, None);
    }

    #[test]
    fn a_key_given_twice_keeps_its_last_value_as_a_value_map_does() {
        let json = r#"{"battery":1,"battery":null,"speed":1,"speed":2}"#;
        let map: serde_json::Map<String, Value> = serde_json::from_str(json).unwrap();
        let fields = read(json);
        assert_eq!(map["battery"], Value::Null);
        assert_eq!(fields.battery, None);
        assert_eq!(map["speed"], Value::from(2));
        assert_eq!(fields.speed, Some(Field::Number(2u64.into())));
    }

    #[test]
    fn escaped_keys_and_strings_read_as_their_text() {
        let fields = read(r#"{"b\u0061ttery":"5","name":"a\"b"}"#);
        assert_eq!(fields.battery, Some(Field::Text(Cow::Borrowed("5"))));
        // Escaped text cannot be borrowed; its value is the same.
        assert_eq!(fields.name, Some(Field::Text("a\"b".into())));
    }

    #[test]
    fn what_a_value_refuses_is_refused_here_too() {
        for json in [
            r#"{"other":1e400}"#,
            r#"{"other":"\ud800"}"#,
            r#"{"battery":1} x"#,
            r#"{"battery":1,}"#,
            "[1,2]",
            "7",
            "\"text\"",
            "null",
            "",
        ] {
            assert!(
                ReadingFields::read(json.as_bytes()).is_err(),
                "{json} should be refused"
            );
            let value = serde_json::from_str::<Value>(json);
            assert!(
                value.is_err() || !value.unwrap().is_object(),
                "{json}: a Value reads it as an object"
            );
        }
    }

    #[test]
    fn composite_values_keep_their_kind_and_text() {
        let fields = read(r#"{"battery":[1,2],"speed":{"a":true}}"#);
        let battery = fields.battery.unwrap();
        assert_eq!(battery.kind(), "array");
        assert_eq!(battery.to_string(), "[1,2]");
        let speed = fields.speed.unwrap();
        assert_eq!(speed.kind(), "object");
        assert_eq!(speed.to_string(), r#"{"a":true}"#);
        assert_eq!(Field::Text("a\"b".into()).to_string(), r#""a\"b""#);
    }

    /// What a `Value` map holds under a key, as the field read here should be.
    fn expected(value: Option<&Value>) -> Option<Field<'static>> {
        match value? {
            Value::Null => None,
            Value::Bool(b) => Some(Field::Bool(*b)),
            Value::Number(n) => Some(Field::Number(n.clone())),
            Value::String(text) => Some(Field::Text(Cow::Owned(text.clone()))),
            composite => Some(Field::Composite(composite.clone())),
        }
    }

    fn any_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "\\PC{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Any object a `Value` reads, written with its keys in any order and some twice, reads
        /// here as the same known fields.
        #[test]
        fn the_fields_are_what_a_value_map_holds(
            entries in proptest::collection::vec(
                (proptest::sample::select(vec![
                    "vin", "name", "profile", "range", "mpge", "battery", "malfunction",
                    "speed", "latitude", "longitude", "date", "other", "battery2", "",
                ]), any_json()),
                0..16,
            ),
        ) {
            // Written by hand, so a key can appear twice as a car's stack might send it.
            let body: Vec<String> = entries
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::from(*k)))
                .collect();
            let json = format!("{{{}}}", body.join(","));
            let map: serde_json::Map<String, Value> = serde_json::from_str(&json).unwrap();
            let fields = ReadingFields::read(json.as_bytes()).unwrap();
            for (name, field) in [
                ("vin", &fields.vin), ("name", &fields.name), ("profile", &fields.profile),
                ("range", &fields.range), ("mpge", &fields.mpge), ("battery", &fields.battery),
                ("malfunction", &fields.malfunction), ("speed", &fields.speed),
                ("latitude", &fields.latitude), ("longitude", &fields.longitude),
                ("date", &fields.date),
            ] {
                proptest::prop_assert_eq!(field, &expected(map.get(name)), "{} in {}", name, json);
            }
        }
    }
}
