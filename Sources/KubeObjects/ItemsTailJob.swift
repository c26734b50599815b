#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// The second half of a big List's `items`, parsed and decoded on a thread of its own while the caller's
/// parser does the first half; the caller's parser takes the result over (`JSONParser.HandOver`) when it
/// reaches the split. The thread only reads the caller's buffer, and the caller joins it before the buffer
/// goes away (`cancelAndJoin` in a `defer`). A plain pthread, not a task: the caller blocks on `join`, and
/// blocking a cooperative-pool thread on another pool job could wait forever on a 1-core machine.
final class ItemsTailJob: @unchecked Sendable {
    enum Outcome {
        /// The kept items (no kind of their own), the position after the list's `]`, the decoded objects and
        /// how many items there were.
        case parsed(kept: [JSONValue], end: Int, objects: ClusterObjects, count: Int)
        case decodeFailed(InputError)
        case syntaxError(JSONSyntaxError)
    }

    private let buffer: UnsafeBufferPointer<UInt8>
    private let split: (offset: Int, index: Int)
    private let source: String
    /// Set when the caller no longer wants the result (it failed first): the tail stops at its next item.
    private let cancelled = Atomic<Bool>(false)
    private var outcome: Outcome? = nil
    private var thread: pthread_t? = nil
    private var joined = false

    init(buffer: UnsafeBufferPointer<UInt8>, split: (offset: Int, index: Int), source: String) {
        self.buffer = buffer; self.split = split; self.source = source
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

    private func run() -> Outcome {
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
