//! TEMPORARY stand-in for vmferry_channel::tunnel while it is written.
#![allow(dead_code, clippy::all)]
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use vmferry_channel::meter::Meter;
#[derive(Debug)]
pub struct Tunnel;
#[derive(Debug, Clone)]
pub struct TunnelStop;
#[derive(Debug, thiserror::Error)]
#[error("tunnel not built yet")]
pub struct TunnelError;
impl TunnelStop {
    pub fn stop(&self) {}
}
impl Tunnel {
    pub fn client(
        _c: rustls::Connection,
        _t: TcpStream,
        _p: &str,
        _m: Arc<Meter>,
    ) -> Result<Tunnel, TunnelError> {
        Err(TunnelError)
    }
    pub fn server(
        _c: rustls::Connection,
        _t: TcpStream,
        _p: &str,
        _m: Arc<Meter>,
        _a: Box<dyn FnMut(u16) -> Result<UnixStream, String> + Send>,
    ) -> Result<Tunnel, TunnelError> {
        Err(TunnelError)
    }
    pub fn open(&self, _k: u16, _l: UnixStream) -> Result<(), TunnelError> {
        Err(TunnelError)
    }
    pub fn streams_done(&self) -> (usize, Option<String>) {
        (0, None)
    }
    pub fn wait_streams(&self, _n: usize, _t: Duration) -> Result<(), String> {
        Err("x".into())
    }
    pub fn close(self, _t: Duration) -> Result<(), String> {
        Ok(())
    }
    pub fn stop(&self) {}
    pub fn stop_handle(&self) -> TunnelStop {
        TunnelStop
    }
}
