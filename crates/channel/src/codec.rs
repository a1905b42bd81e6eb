//! A protobuf codec whose per-stream encode buffer starts small.
//!
//! tonic gives every response stream an encode buffer of 8 KiB up front,
//! and keeps it for the stream's life (each message is split off the same
//! allocation). A control plane holds one stream per proxy per followed
//! name: at 100,000 mostly idle streams that buffer alone is 800 MiB.
//! Starting at [`BUFFER`] bytes, the buffer grows only when a message
//! needs it.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The initial encode buffer: a typical Destination update (two meshed
/// endpoints) fits; a larger message grows it.
pub const BUFFER: usize = 256;
/// Encoded messages are handed to the transport once this many bytes are
/// waiting (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with a [`BUFFER`]-byte initial encode buffer.
#[derive(Debug)]
pub struct Lean<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Lean<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for Lean<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}
