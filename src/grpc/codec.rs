//! The contract's codec: prost, with small initial buffers. Every open stream keeps its encode buffer for its
//! whole life, and tonic's default (8 KiB) was most of an idle watch's memory. An idle watch sends only
//! heartbeats (under 20 bytes with the frame's header), so its buffer starts at 64 bytes and grows only when a
//! notification (a few hundred bytes) needs more — once per stream, as the buffer keeps what it grew to and is
//! reused for every later message. 1 KiB → 256 → 64 bytes took 766 and then about 190 bytes off each idle watch
//! (BENCHMARKS.md, issue 16). A unary response grows it at most a few times while it is encoded.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// The initial size of each call's encode buffer: a heartbeat fits.
const ENCODE_BUFFER: usize = 64;
/// The initial size of each call's decode buffer (freed when a streaming call has read its request).
const DECODE_BUFFER: usize = 256;
/// tonic's default: yield to the runtime after encoding this much in one go.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`ProstCodec`] with [`ENCODE_BUFFER`] and [`DECODE_BUFFER`]; named by `codec_path` in build.rs.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        SmallBufferCodec(PhantomData)
    }
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(ENCODE_BUFFER, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(DECODE_BUFFER, YIELD_THRESHOLD))
    }
}
