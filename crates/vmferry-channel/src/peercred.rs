//! Who is on the other end of a local unix socket, as the kernel says (SO_PEERCRED).
//! Never trust anything the peer says about itself instead.

use std::os::unix::net::UnixStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(s: &UnixStream) -> std::io::Result<PeerCred> {
    let c = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(PeerCred {
        pid: Some(c.pid()).filter(|p| *p > 0),
        uid: c.uid(),
        gid: c.gid(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_credentials_name_our_own_uid() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let c = peer_cred(&a).expect("cred");
        assert_eq!(c.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(c.pid, Some(std::process::id() as i32));
    }
}
