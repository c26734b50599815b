import Foundation

/// A committed change to our table that this process did not make.
public struct NftablesChange: Sendable, Equatable {
    /// The ruleset generation the change committed (NFTA_GEN_ID); 0 with `lostNotifications`.
    public var generation: UInt32
    /// The committing process as the kernel names it (NFTA_GEN_PROC_PID / _NAME; the pid is the kernel's,
    /// of the committing thread, in the initial pid namespace), e.g. `nft`.
    public var processID: UInt32?
    public var processName: String?
    /// The socket's receive buffer overflowed and notifications were lost (e.g. during a huge apply):
    /// the table may or may not have changed. Read it back and compare (`NftablesConnection.read`).
    public var lostNotifications: Bool

    public init(generation: UInt32, processID: UInt32?, processName: String?, lostNotifications: Bool) {
        self.generation = generation; self.processID = processID; self.processName = processName
        self.lostNotifications = lostNotifications
    }
}

/// Watches `table inet <table>` in a network namespace for changes that this process did not make (drift:
/// someone ran `nft delete table …`, or edited an element), through nf_tables' own notifications
/// (the NFNLGRP_NFTABLES multicast group that `nft monitor` listens to). Each transaction's messages name the
/// tables they touch and its NFT_MSG_NEWGEN carries the port id of the committing socket: a transaction is
/// reported when it touched our table and its socket is not one this process opened (`NftablesNetlink`
/// and `NftablesConnection` alike, on any thread). Nothing is polled: the kernel pushes the messages as it
/// commits.
///
/// `next(timeout:)` blocks the calling thread; `events()` runs the loop on a thread of its own. `stop()`
/// wakes either at once and closes the stream.
public final class NftablesChangeMonitor: @unchecked Sendable {
    public let namespace: NetworkNamespace?
    public let table: String
    private let socket: NetlinkSocket
    private let stopSignal: StopSignal
    private let lock = NSLock()
    private var filter: NftChangeFilter
    private var pending: [NftablesChange] = []
    private var stopped = false

    /// Subscribes in `namespace` (nil: the caller's own). Changes committed before this returns are not seen.
    public init(namespace: NetworkNamespace? = nil, table: String) throws(NetlinkError) {
        self.namespace = namespace
        self.table = table
        do {
            socket = try namespace.run { try NetlinkSocket() }
        } catch let e as NetlinkError {
            throw e
        } catch {
            throw NetlinkError(kind: .io, operation: "opening a netlink socket", errno: 5, message: "\(error)")
        }
        try socket.joinNftablesNotifications()
        // A full apply of a large plan announces every element (one message each, ~100 bytes): room for a
        // few hundred thousand before the kernel drops any (then `lostNotifications`).
        socket.raiseBuffers(send: 1 << 16, receive: 64 << 20)
        stopSignal = try StopSignal()
        filter = NftChangeFilter(table: table, isOwnPort: { OwnNetlinkPorts.shared.contains($0) })
    }

    /// The next change, waiting up to `timeout` seconds (`.infinity`: until one comes); nil on timeout or
    /// once `stop()` was called. One caller at a time.
    public func next(timeout: Double) throws(NetlinkError) -> NftablesChange? {
        let deadline = timeout.isFinite ? Date().addingTimeInterval(timeout) : nil
        while true {
            lock.lock()
            if stopped { lock.unlock(); return nil }
            if !pending.isEmpty { let c = pending.removeFirst(); lock.unlock(); return c }
            lock.unlock()
            let wait: Int32
            if let deadline {
                let ms = deadline.timeIntervalSinceNow * 1000
                if ms <= 0 { return nil }
                wait = Int32(min(ms.rounded(.up), Double(Int32.max)))
            } else {
                wait = -1
            }
            guard try socket.waitReadable(timeoutMilliseconds: wait, stop: stopSignal) else { continue }
            try drain()
        }
    }

    /// Reads every datagram that is queued and folds it into `pending`.
    private func drain() throws(NetlinkError) {
        while true {
            let datagram: [UInt8]?
            do {
                datagram = try socket.receive(timeoutMilliseconds: 0)
            } catch where error.errno == 105 /* ENOBUFS */ {
                lock.lock()
                filter.reset()
                pending.append(NftablesChange(generation: 0, processID: nil, processName: nil, lostNotifications: true))
                lock.unlock()
                continue
            }
            guard let datagram else { return }
            lock.lock()
            pending += filter.consume(datagram: datagram)
            lock.unlock()
        }
    }

    /// The changes, read on a thread of its own until `stop()` (the stream then finishes) or an error (the
    /// stream finishes with it). Call once.
    public func events() -> AsyncThrowingStream<NftablesChange, any Error> {
        AsyncThrowingStream { continuation in
            let thread = Thread { [self] in
                do {
                    while let change = try next(timeout: .infinity) { continuation.yield(change) }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            thread.name = "hostnet-dnat nftables monitor"
            continuation.onTermination = { [self] _ in stop() }
            thread.start()
        }
    }

    /// Wakes a blocked `next` (it returns nil) and ends `events()`. Idempotent.
    public func stop() {
        lock.lock()
        let first = !stopped
        stopped = true
        lock.unlock()
        if first { stopSignal.signal() }
    }

    deinit { stop() }
}
