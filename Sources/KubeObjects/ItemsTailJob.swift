#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// The second half of a big List's `items`, found and parsed on a thread of its own while the caller's
/// parser does the first half. This thread scans for an item near `target` (`JSONParser.itemsSplit`), says
/// so if the caller has not got there yet, and parses from it to the list's end; the caller's parser takes
/// the result over (`JSONParser.HandOver`) when it reaches that item. The thread only reads the caller's
/// buffer, and the caller joins it before the buffer goes away (`cancelAndJoin` in a `defer`). A plain
/// pthread, not a task: the caller blocks on `join`, and blocking a cooperative-pool thread on another pool
/// job could wait forever on a 1-core machine.
final class ItemsTailJob: @unchecked Sendable {
    enum Outcome {
        /// The kept items (no kind of their own), the position after the list's `]`, the decoded objects and
        /// how many items there were.
        case parsed(kept: [JSONValue], end: Int, objects: ClusterObjects, count: Int)
        case decodeFailed(InputError)
        case syntaxError(JSONSyntaxError)
        /// No split found, or the caller was past it already: the caller parses everything.
        case noSplit
    }

    /// Where the caller's parser is (an item's first byte), and the split once this thread has published it.
    private struct Meeting {
        var callerPosition = 0
        var split: (offset: Int, index: Int)? = nil
        var decided = false
    }

    private let buffer: UnsafeBufferPointer<UInt8>
    private let listStart: Int
    private let target: Int
    private let source: String
    private let meeting = Mutex(Meeting())
    /// Set when the caller no longer wants the result (it failed first): the tail stops at its next item.
    private let cancelled = Atomic<Bool>(false)
    private var outcome: Outcome? = nil
    private var thread: pthread_t? = nil
    private var joined = false

    init(buffer: UnsafeBufferPointer<UInt8>, from start: Int, near target: Int, source: String) {
        self.buffer = buffer; self.listStart = start; self.target = target; self.source = source
    }

    /// False when no thread could be started (the caller then parses everything itself).
    func start() -> Bool {
        let context = Unmanaged.passRetained(self).toOpaque()
        var id = pthread_t()
        let rc = pthread_create(&id, nil, { raw in
            let job = Unmanaged<ItemsTailJob>.fromOpaque(raw!).takeRetainedValue()
            job.outcome = job.run()
            return nil
        }, context)
        guard rc == 0 else {
            Unmanaged<ItemsTailJob>.fromOpaque(context).release()
            return false
        }
        thread = id
        return true
    }

    /// The caller's parser, at an item's first byte: true when the tail starts exactly here. Until the split
    /// is published it records the position, so the split is only published ahead of the caller.
    func startsHere(_ position: Int) -> Bool {
        meeting.withLock { m in
            if let split = m.split { return split.offset == position }
            m.callerPosition = position
            return false
        }
    }

    private func run() -> Outcome {
        let found = JSONParser.itemsSplit(buffer, from: listStart, near: target)
        let published: (offset: Int, index: Int)? = meeting.withLock { m in
            m.decided = true
            guard let found, m.callerPosition < found.offset else { return nil }
            m.split = found
            return found
        }
        guard let split = published else { return .noSplit }
        var objects = ClusterObjects()
        var index = split.index
        var failure: InputError? = nil
        do throws(JSONSyntaxError) {
            let tail = try JSONParser.parseItemsTail(buffer, from: split.offset) { item in
                if cancelled.load(ordering: .relaxed) { return .stop }
                defer { index += 1 }
                return DocumentLoader.streamItem(item, index: index, source: source, into: &objects, error: &failure)
            }
            guard let tail else {
                // Stopped: by a decoding error, or cancelled (then nobody reads the outcome).
                return .decodeFailed(failure ?? InputError(source: source, message: "cancelled"))
            }
            return .parsed(kept: tail.kept, end: tail.end, objects: objects, count: index - split.index)
        } catch {
            return .syntaxError(error)
        }
    }

    /// Blocks until this thread has decided where (and whether) it takes over: for tests, which must see a
    /// hand-over happen whatever the timing.
    func waitUntilDecided() {
        while !meeting.withLock({ $0.decided }) { sched_yield() }
    }

    /// Waits for the tail and returns what it found.
    func join() -> Outcome {
        if !joined, let thread {
            pthread_join(thread, nil)
            joined = true
        }
        return outcome!
    }

    func cancelAndJoin() {
        guard !joined, thread != nil else { return }
        cancelled.store(true, ordering: .relaxed)
        _ = join()
    }
}
