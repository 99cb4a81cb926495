//! One request, one reply, on one stream: the shape of Caisey's small protocols (enrollment,
//! publishing). Messages are length-prefixed JSON, bounded before anything is allocated.

use anyhow::{Result, bail};
use iroh::endpoint::{RecvStream, SendStream};
use serde::{Deserialize, Serialize};

/// The largest request or reply (a published transcript can be large).
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

pub async fn write_msg<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<()> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_MESSAGE {
        bail!("message of {} bytes is larger than the {MAX_MESSAGE} allowed", body.len());
    }
    send.write_all(&(body.len() as u32).to_be_bytes()).await?;
    send.write_all(&body).await?;
    Ok(())
}

/// Reads one message of at most `max` bytes (callers bound what an unauthenticated or
/// not-yet-authorized peer can make them allocate).
pub async fn read_msg<T: for<'de> Deserialize<'de>>(recv: &mut RecvStream, max: usize) -> Result<T> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max.min(MAX_MESSAGE) {
        bail!("message of {len} bytes is too large");
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}
