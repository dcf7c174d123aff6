//! The source's job: libvirt's migration call on a thread of its own, and a watcher
//! beside it that turns libvirt's job progress into the migration's status, switches to
//! post-copy when asked, and aborts libvirt's job on a cancel, an expired lease or a
//! stream that failed.
//!
//! It must never abort a job that has switched to post-copy (the guest runs on the
//! destination then), and never block the control requests: it runs on its own threads.

use super::*;

/// A progress query slower than this is logged: the watcher acts on nothing meanwhile.
const SLOW_ANSWER: Duration = Duration::from_secs(5);

/// How often the watcher logs what it sees of libvirt's job.
const WATCH_REPORT: Duration = Duration::from_secs(20);

impl LibvirtSource {
    fn migrate_call(&self) -> (virt::domain::MigrateParameters, u32) {
        use virt::sys;
        let unix = |name: &str| format!("unix://{}", self.plan.dir.join(name).display());
        let o = &self.options;
        let mut flags = sys::VIR_MIGRATE_LIVE
            | sys::VIR_MIGRATE_PEER2PEER
            | sys::VIR_MIGRATE_PERSIST_DEST
            | sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        let mut p = virt::domain::MigrateParameters {
            uri: Some(unix(MIGRATE_SOCKET)),
            ..Default::default()
        };
        if let Some(copy) = o.copy_storage {
            flags |= match copy.mode {
                StorageMode::All => sys::VIR_MIGRATE_NON_SHARED_DISK,
                StorageMode::Inc => sys::VIR_MIGRATE_NON_SHARED_INC,
            };
            if copy.copy_mode == CopyMode::WriteBlocking {
                flags |= sys::VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES;
            }
            p.disks_uri = Some(unix(NBD_SOCKET));
            p.migrate_disks = self.plan.disks.iter().map(|d| d.target.clone()).collect();
        }
        if o.max_bandwidth > 0 {
            // libvirt's unit is MiB/s.
            p.bandwidth = Some(o.max_bandwidth.div_ceil(1 << 20).max(1));
        }
        if o.multifd > 0 {
            flags |= sys::VIR_MIGRATE_PARALLEL;
            p.parallel_connections = Some(i32::try_from(o.multifd).unwrap_or(i32::MAX));
        }
        if o.postcopy.is_some() {
            flags |= sys::VIR_MIGRATE_POSTCOPY;
        }
        if let Some(ac) = o.auto_converge {
            flags |= sys::VIR_MIGRATE_AUTO_CONVERGE;
            p.auto_converge_initial = Some(i32::from(ac.initial));
            p.auto_converge_increment = Some(i32::from(ac.increment));
        }
        (p, flags)
    }

    /// The job: libvirt's migration call, with a watcher beside it.
    pub(super) fn run_job(self: Arc<Self>, daemon: &Arc<Daemon>, desturi: String) {
        let started = Instant::now();
        let result = (|| -> Result<()> {
            let lv = api::open(&daemon.config.libvirt_uri)?;
            let dom = lv.domain(&self.domain)?.ok_or_else(|| {
                DaemonError::NotFound(format!("domain {} is gone from this host", self.domain))
            })?;
            let (params, flags) = self.migrate_call();
            tracing::info!(migration = %self.id, domain = %self.domain, %desturi, "libvirt migrates");
            let done = Arc::new(AtomicBool::new(false));
            let watcher = {
                let (m, dom, done) = (self.clone(), dom.clone(), done.clone());
                let uri = daemon.config.libvirt_uri.clone();
                std::thread::Builder::new()
                    .name("libvirt-watch".into())
                    .spawn(move || {
                        // Its own connection: the migration call holds the other one for
                        // the whole job. (Sharing it, the watcher's first progress query
                        // sometimes never returned, and post-copy was never asked for.)
                        let own = api::open(&uri).and_then(|lv| {
                            let d = lv.domain(&m.domain)?.ok_or_else(|| {
                                DaemonError::NotFound(format!("domain {} is gone", m.domain))
                            })?;
                            Ok((lv, d))
                        });
                        match own {
                            Ok((_lv, d)) => m.watch(&d, &done, started),
                            Err(e) => {
                                tracing::warn!(migration = %m.id, "the watcher shares the migration's libvirt connection: it could not open its own: {e}");
                                m.watch(&dom, &done, started)
                            }
                        }
                    })
                    .map_err(|e| DaemonError::Internal(format!("cannot start the watcher: {e}")))?
            };
            let r = dom.migrate_to_uri3(Some(&desturi), params, flags);
            done.store(true, Ordering::SeqCst);
            // Woken at once: the completion must not wait out the watcher's poll.
            watcher.thread().unpark();
            let _ = watcher.join();
            r.map_err(|e| DaemonError::Libvirt(e.message().trim().to_string()))
        })();
        let elapsed = started.elapsed().as_millis() as u64;
        match result {
            Ok(()) => {
                let _ = self.advance(SourceEvent::QemuCompleted);
                let mut st = lock(&self.status);
                st.qemu_status = "completed".into();
                st.total_time_ms = Some(elapsed);
                st.ram_remaining = 0;
                st.ram_transferred = st.ram_transferred.max(st.ram_total);
                for d in st.disks.iter_mut() {
                    d.ready = true;
                }
                st.channel_bytes = self.meter.forward();
                if let Some(r) = lock(&self.relay).as_ref() {
                    st.streams = u32::from(r.connections(StreamKind::Qemu));
                }
                st.finished = true;
                tracing::info!(migration = %self.id, domain = %self.domain, "libvirt completed the migration in {elapsed} ms");
            }
            Err(DaemonError::Libvirt(msg)) => self.fail(daemon, &self.cause(&msg)),
            Err(e) => self.fail(daemon, &e.to_string()),
        }
        self.job_done.store(true, Ordering::SeqCst);
        self.finished.notify_all();
    }

    /// libvirt's words, with vmferry's cause where it has one.
    fn cause(&self, libvirt: &str) -> String {
        let ours = lock(&self.abort).clone().or_else(|| {
            lock(&self.relay)
                .as_ref()
                .and_then(|r| r.streams.first_error())
        });
        match ours {
            Some(why) => format!("{why} (libvirt: {libvirt})"),
            None => format!("libvirt: {libvirt}"),
        }
    }

    /// Follows libvirt's job until it returns: progress, post-copy, and aborts.
    fn watch(&self, dom: &virt::domain::Domain, done: &AtomicBool, started: Instant) {
        let mut aborted = false;
        let mut last: Option<(Instant, u64)> = None;
        let mut last_error: Option<String> = None;
        let mut ram_seen = false;
        let mut said: Option<Instant> = None;
        while !done.load(Ordering::SeqCst) {
            let asked = Instant::now();
            let progress = api::progress(dom);
            if asked.elapsed() > SLOW_ANSWER {
                tracing::warn!(migration = %self.id, "libvirt took {:?} to report the job's progress", asked.elapsed());
            }
            // A failing progress query would leave post-copy and aborts unseen: say so,
            // once per distinct error.
            match &progress {
                Err(e) if last_error.as_deref() != Some(&e.to_string()) => {
                    tracing::warn!(migration = %self.id, "cannot read libvirt's job progress: {e}");
                    last_error = Some(e.to_string());
                }
                Err(_) => {}
                Ok(_) => last_error = None,
            }
            if let Ok(p) = progress {
                // What the watcher sees, now and then: a job it never acts on says why.
                if said.is_none_or(|t: Instant| t.elapsed() >= WATCH_REPORT) {
                    said = Some(Instant::now());
                    tracing::info!(migration = %self.id, active = p.active, memory = p.mem_processed, total = p.mem_total, state = %self.state(), "libvirt's job as the watcher sees it");
                }
                self.show(&p, &mut last);
                if p.active && p.mem_processed > 0 && !ram_seen {
                    ram_seen = true;
                    tracing::info!(migration = %self.id, state = %self.state(), "libvirt's job moves memory");
                }
                let postcopy = self.options.postcopy;
                if let (Some(pc), SourceState::Performing, true) =
                    (postcopy, self.state(), p.active)
                {
                    let first_pass = p.mem_total > 0 && p.mem_processed >= p.mem_total;
                    let after = pc
                        .after_ms
                        .is_some_and(|ms| started.elapsed() >= Duration::from_millis(ms));
                    // libvirt copies the disks first and moves the RAM once they are in
                    // sync (the guest's later writes are mirrored): RAM under way means
                    // the disks are done.
                    let ram_moving = p.mem_total > 0 && p.mem_processed > 0;
                    if (first_pass || after) && ram_moving {
                        match ffi::start_postcopy(dom) {
                            Ok(()) => {
                                tracing::info!(migration = %self.id, "libvirt switched the migration to post-copy");
                                let _ = self.advance(SourceEvent::StartPostCopy);
                                lock(&self.status).qemu_status = "postcopy-active".into();
                            }
                            Err(e) => {
                                tracing::info!(migration = %self.id, "post-copy not started yet: {}", e.message())
                            }
                        }
                    }
                }
            }
            let stream_failed = lock(&self.relay)
                .as_ref()
                .and_then(|r| r.streams.first_error());
            if let (Some(why), false) = (stream_failed, aborted) {
                lock(&self.abort).get_or_insert(why);
            }
            let abort = lock(&self.abort).clone();
            if let (Some(why), false) = (abort, aborted) {
                if self.state() != SourceState::PostCopy {
                    tracing::warn!(migration = %self.id, "aborting libvirt's job: {why}");
                    if let Err(e) = ffi::abort_job(dom) {
                        tracing::warn!("abort job: {}", e.message());
                    }
                    aborted = true;
                }
            }
            std::thread::park_timeout(LIBVIRT_POLL);
        }
    }

    fn show(&self, p: &api::Progress, last: &mut Option<(Instant, u64)>) {
        let now = Instant::now();
        let mut st = lock(&self.status);
        if p.active {
            if st.qemu_status != "postcopy-active" {
                st.qemu_status = "active".into();
            }
            st.ram_total = p.mem_total;
            st.ram_transferred = p.mem_processed;
            st.ram_remaining = p.mem_remaining;
            st.pass = u64::from(p.mem_total > 0 && p.mem_processed >= p.mem_total) + 1;
            if let Some((t, b)) = *last {
                let secs = now.duration_since(t).as_secs_f64();
                if secs > 0.0 && p.mem_processed >= b {
                    st.mbps = (p.mem_processed - b) as f64 * 8.0 / 1e6 / secs;
                }
            }
            *last = Some((now, p.mem_processed));
            if p.disk_total > 0 {
                st.disks = vec![DiskProgress {
                    device: self
                        .plan
                        .disks
                        .iter()
                        .map(|d| d.target.as_str())
                        .collect::<Vec<_>>()
                        .join("+"),
                    copied: p.disk_processed,
                    total: p.disk_total,
                    ready: p.disk_remaining == 0,
                    in_sync_ms: None,
                }];
            }
        }
        st.channel_bytes = self.meter.forward();
        st.wire_bytes = self.meter.wire_forward();
        if let Some(r) = lock(&self.relay).as_ref() {
            st.streams = u32::from(r.connections(StreamKind::Qemu));
        }
    }
}
