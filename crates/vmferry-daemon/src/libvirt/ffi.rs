//! The two libvirt calls the `virt` crate (0.5) does not wrap: abort a domain's job, and
//! switch a running migration to post-copy. The only unsafe code in the daemon: each is
//! one call into libvirt with a domain the `virt` crate keeps alive for the call.
//!
//! It must never do more than call libvirt and read its last error.
#![allow(unsafe_code)]

use virt::domain::Domain;
use virt::error::Error;

/// `virDomainAbortJob`: cancels the domain's migration job.
pub fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: `dom` holds a valid domain reference for the duration of the call.
    let r = unsafe { virt::sys::virDomainAbortJob(dom.as_ptr()) };
    if r < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}

/// `virDomainMigrateStartPostCopy`: the running migration (started with
/// `VIR_MIGRATE_POSTCOPY`) switches to post-copy.
pub fn start_postcopy(dom: &Domain) -> Result<(), Error> {
    // SAFETY: as above; flags must be 0.
    let r = unsafe { virt::sys::virDomainMigrateStartPostCopy(dom.as_ptr(), 0) };
    if r < 0 {
        return Err(Error::last_error());
    }
    Ok(())
}
