//! The fixed-width encoding of the pool's hot path: a value that serializes
//! as exactly one primitive (an integer, a float, a `bool`, a `char`, or a
//! newtype around one) is its little-endian bytes at the primitive's own
//! width, with no varint and no per-value decoder state. A `u64` encodes in
//! one store and decodes in one load, where postcard spends tens of
//! instructions on its varint. Anything else is refused (`None` /
//! `Err`), and the caller uses postcard for it.
//!
//! Each encoded value has a *kind* (which primitive method wrote it); a
//! batch of values shares one kind, carried once in its header, and the
//! decoder refuses a value read as another kind. So a type whose
//! `Serialize` and `Deserialize` disagree (`u64` out, `u32` in) is an error,
//! never a misread; the encoder checks the first value of a batch by
//! decoding it back, and a batch whose values change kind falls back to
//! postcard.

use std::fmt;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::ser::{self, Impossible, Serialize};

/// Why a value has no fixed-width encoding (or the bytes do not decode):
/// never shown to users, the caller falls back to postcard.
#[derive(Debug)]
pub(crate) struct NotFixed;

impl fmt::Display for NotFixed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a fixed-width value")
    }
}

impl std::error::Error for NotFixed {}

impl ser::Error for NotFixed {
    fn custom<T: fmt::Display>(_: T) -> NotFixed {
        NotFixed
    }
}

impl de::Error for NotFixed {
    fn custom<T: fmt::Display>(_: T) -> NotFixed {
        NotFixed
    }
}

/// Which primitive a fixed-width value is (never 0: 0 stands for "not
/// fixed-width" in the pool's frame headers).
pub(crate) type Kind = u8;

const BOOL: Kind = 1;
const I8: Kind = 2;
const I16: Kind = 3;
const I32: Kind = 4;
const I64: Kind = 5;
const I128: Kind = 6;
const U8: Kind = 7;
const U16: Kind = 8;
const U32: Kind = 9;
const U64: Kind = 10;
const U128: Kind = 11;
const F32: Kind = 12;
const F64: Kind = 13;
const CHAR: Kind = 14;

/// Appends the fixed-width encoding of `value` to `out` and returns its
/// kind if it has one (then exactly its bytes were appended); `None` with
/// `out` unchanged otherwise.
#[inline]
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Option<Kind> {
    let len = out.len();
    let mut ser = FixedSerializer {
        out,
        kind: 0,
        calls: 0,
    };
    match value.serialize(&mut ser) {
        Ok(()) if ser.calls == 1 => Some(ser.kind),
        _ => {
            out.truncate(len);
            None
        }
    }
}

/// The kind of `value` if it encodes fixed-width *and* decodes back as a
/// `T` from exactly those bytes: the check made on the first value of a
/// batch before the batch is encoded that way.
pub(crate) fn round_trip_kind<T: Serialize + DeserializeOwned>(value: &T) -> Option<Kind> {
    let mut buf = Vec::with_capacity(16);
    let kind = encode(value, &mut buf)?;
    let mut input = buf.as_slice();
    (take::<T>(&mut input, kind).is_ok() && input.is_empty()).then_some(kind)
}

/// Decodes one fixed-width `T` of kind `kind` off the front of `input` and
/// advances it. `Err` if `T` reads another kind, or the bytes are short.
#[inline]
pub(crate) fn take<T: DeserializeOwned>(input: &mut &[u8], kind: Kind) -> Result<T, NotFixed> {
    T::deserialize(FixedDeserializer { input, kind })
}

struct FixedSerializer<'a> {
    out: &'a mut Vec<u8>,
    kind: Kind,
    /// Primitive values written: a fixed-width value is exactly one.
    calls: u32,
}

impl FixedSerializer<'_> {
    #[inline(always)]
    fn put<const N: usize>(&mut self, kind: Kind, bytes: [u8; N]) -> Result<(), NotFixed> {
        self.calls += 1;
        self.kind = kind;
        self.out.extend_from_slice(&bytes);
        Ok(())
    }
}

macro_rules! ser_prim {
    ($($method:ident: $ty:ty => $kind:ident),* $(,)?) => {
        $(
            #[inline(always)]
            fn $method(self, v: $ty) -> Result<(), NotFixed> {
                self.put($kind, v.to_le_bytes())
            }
        )*
    };
}

macro_rules! ser_refuse {
    ($($method:ident($($arg:ty),*)),* $(,)?) => {
        $(
            fn $method(self, $(_: $arg),*) -> Result<(), NotFixed> {
                Err(NotFixed)
            }
        )*
    };
}

impl ser::Serializer for &mut FixedSerializer<'_> {
    type Ok = ();
    type Error = NotFixed;
    type SerializeSeq = Impossible<(), NotFixed>;
    type SerializeTuple = Impossible<(), NotFixed>;
    type SerializeTupleStruct = Impossible<(), NotFixed>;
    type SerializeTupleVariant = Impossible<(), NotFixed>;
    type SerializeMap = Impossible<(), NotFixed>;
    type SerializeStruct = Impossible<(), NotFixed>;
    type SerializeStructVariant = Impossible<(), NotFixed>;

    ser_prim! {
        serialize_i8: i8 => I8, serialize_i16: i16 => I16, serialize_i32: i32 => I32,
        serialize_i64: i64 => I64, serialize_i128: i128 => I128, serialize_u8: u8 => U8,
        serialize_u16: u16 => U16, serialize_u32: u32 => U32, serialize_u64: u64 => U64,
        serialize_u128: u128 => U128, serialize_f32: f32 => F32, serialize_f64: f64 => F64,
    }

    #[inline(always)]
    fn serialize_bool(self, v: bool) -> Result<(), NotFixed> {
        self.put(BOOL, [u8::from(v)])
    }

    #[inline(always)]
    fn serialize_char(self, v: char) -> Result<(), NotFixed> {
        self.put(CHAR, u32::from(v).to_le_bytes())
    }

    #[inline(always)]
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), NotFixed> {
        value.serialize(self)
    }

    ser_refuse! {
        serialize_str(&str), serialize_bytes(&[u8]), serialize_none(),
        serialize_unit(), serialize_unit_struct(&'static str),
        serialize_unit_variant(&'static str, u32, &'static str),
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), NotFixed> {
        Err(NotFixed)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<(), NotFixed> {
        Err(NotFixed)
    }

    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, NotFixed> {
        Err(NotFixed)
    }

    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, NotFixed> {
        Err(NotFixed)
    }

    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct, NotFixed> {
        Err(NotFixed)
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant, NotFixed> {
        Err(NotFixed)
    }

    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, NotFixed> {
        Err(NotFixed)
    }

    fn serialize_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStruct, NotFixed> {
        Err(NotFixed)
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant, NotFixed> {
        Err(NotFixed)
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

struct FixedDeserializer<'a, 'b> {
    input: &'b mut &'a [u8],
    /// The kind the values were written as.
    kind: Kind,
}

impl FixedDeserializer<'_, '_> {
    #[inline(always)]
    fn get<const N: usize>(&mut self, kind: Kind) -> Result<[u8; N], NotFixed> {
        if kind != self.kind {
            return Err(NotFixed);
        }
        let (head, rest) = self.input.split_first_chunk::<N>().ok_or(NotFixed)?;
        *self.input = rest;
        Ok(*head)
    }
}

macro_rules! de_prim {
    ($($method:ident: $ty:ty => $kind:ident $visit:ident),* $(,)?) => {
        $(
            #[inline(always)]
            fn $method<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, NotFixed> {
                visitor.$visit(<$ty>::from_le_bytes(self.get($kind)?))
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for FixedDeserializer<'_, '_> {
    type Error = NotFixed;

    de_prim! {
        deserialize_i8: i8 => I8 visit_i8, deserialize_i16: i16 => I16 visit_i16,
        deserialize_i32: i32 => I32 visit_i32, deserialize_i64: i64 => I64 visit_i64,
        deserialize_i128: i128 => I128 visit_i128, deserialize_u8: u8 => U8 visit_u8,
        deserialize_u16: u16 => U16 visit_u16, deserialize_u32: u32 => U32 visit_u32,
        deserialize_u64: u64 => U64 visit_u64, deserialize_u128: u128 => U128 visit_u128,
        deserialize_f32: f32 => F32 visit_f32, deserialize_f64: f64 => F64 visit_f64,
    }

    #[inline(always)]
    fn deserialize_bool<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, NotFixed> {
        match self.get::<1>(BOOL)?[0] {
            0 => visitor.visit_bool(false),
            1 => visitor.visit_bool(true),
            _ => Err(NotFixed),
        }
    }

    #[inline(always)]
    fn deserialize_char<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, NotFixed> {
        let c = char::from_u32(u32::from_le_bytes(self.get(CHAR)?)).ok_or(NotFixed)?;
        visitor.visit_char(c)
    }

    #[inline(always)]
    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, NotFixed> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, NotFixed> {
        Err(NotFixed)
    }

    serde::forward_to_deserialize_any! {
        str string bytes byte_buf option unit unit_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }

    fn is_human_readable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Meters(f64);

    #[derive(Debug, PartialEq, serde::Serialize, Deserialize)]
    struct Point {
        x: u32,
        y: u32,
    }

    fn round<T: Serialize + DeserializeOwned + PartialEq + fmt::Debug>(v: T, width: usize) {
        let mut out = vec![0xAA];
        let kind = encode(&v, &mut out).unwrap_or_else(|| panic!("{v:?}"));
        assert_eq!(out.len(), 1 + width, "{v:?}");
        let mut input = &out[1..];
        assert_eq!(take::<T>(&mut input, kind).unwrap(), v);
        assert!(input.is_empty());
        assert_eq!(round_trip_kind(&v), Some(kind));
    }

    #[test]
    fn primitives_and_newtypes_round_trip_at_their_width() {
        round(u64::MAX - 7, 8);
        round(-5i64, 8);
        round(7u8, 1);
        round(-300i16, 2);
        round(0xdead_beefu32, 4);
        round(i128::MIN, 16);
        round(u128::MAX, 16);
        round(1.5f32, 4);
        round(f64::NEG_INFINITY, 8);
        round(true, 1);
        round('é', 4);
        round(Meters(3.25), 8);
    }

    #[test]
    fn everything_else_is_refused_and_leaves_the_buffer() {
        let mut out = vec![1, 2, 3];
        assert_eq!(encode(&Point { x: 1, y: 2 }, &mut out), None);
        assert_eq!(encode(&"text", &mut out), None);
        assert_eq!(encode(&Some(3u64), &mut out), None);
        assert_eq!(encode(&(1u8, 2u8), &mut out), None);
        assert_eq!(encode(&vec![1u64], &mut out), None);
        assert_eq!(encode(&(), &mut out), None);
        assert_eq!(out, [1, 2, 3]);
        assert_eq!(round_trip_kind(&Point { x: 1, y: 2 }), None);
    }

    #[test]
    fn short_or_invalid_input_is_an_error() {
        let mut input: &[u8] = &[1, 2, 3];
        assert!(take::<u64>(&mut input, U64).is_err());
        let mut input: &[u8] = &[2];
        assert!(take::<bool>(&mut input, BOOL).is_err());
        let mut input: &[u8] = &0xD800u32.to_le_bytes();
        assert!(take::<char>(&mut input, CHAR).is_err());
        let mut input: &[u8] = &[0; 16];
        assert!(take::<String>(&mut input, U64).is_err());
        assert!(take::<Point>(&mut input, U32).is_err());
        // Read as another kind than written: refused, not misread.
        assert!(take::<u32>(&mut input, U64).is_err());
        assert!(take::<i64>(&mut input, U64).is_err());
        assert_eq!(input.len(), 16, "nothing consumed");
    }

    /// A type whose `Serialize` and `Deserialize` disagree on the width
    /// fails the round-trip check (so a batch of it is sent with postcard).
    #[test]
    fn a_width_mismatch_fails_the_check() {
        #[derive(Debug)]
        struct Odd(u32);
        impl Serialize for Odd {
            fn serialize<S: ser::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_u64(u64::from(self.0))
            }
        }
        impl<'de> Deserialize<'de> for Odd {
            fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Odd, D::Error> {
                u32::deserialize(d).map(Odd)
            }
        }
        assert_eq!(round_trip_kind(&Odd(5)), None);
    }
}
