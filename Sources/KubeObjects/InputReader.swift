#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Why an input could not be read whole.
public enum InputReadError: Error, Sendable, Equatable, CustomStringConvertible {
    /// More than `limit` bytes (a regular file says so up front; a pipe or device once `limit` is passed).
    case tooLarge(name: String, limit: Int)
    case isDirectory(name: String)
    case failed(name: String, reason: String)

    public var description: String {
        switch self {
        case .tooLarge(let name, let limit):
            return "\(name): larger than the input limit of \(InputReader.describe(bytes: limit)); raise it with --max-input-bytes"
        case .isDirectory(let name):
            return "\(name): is a directory"
        case .failed(let name, let reason):
            return "\(name): cannot read (\(reason))"
        }
    }
}

/// Reads whole files and pipes into one buffer, never more than a limit.
public enum InputReader {
    /// Default input limit: 1 GiB. `kubectl get services,endpointslices -A -o json` for 50,000 Services is
    /// about 450 MB; twice that leaves room, and decoding what is read costs about as much again.
    public static let defaultLimit = 1 << 30

    /// Reads `fd` to its end. A regular file is sized first and refused at once when it is over `limit`;
    /// anything else (a pipe, `/dev/zero`) is read until `limit` is passed. The buffer grows by doubling,
    /// so memory stays within about twice what was read.
    public static func readAll(fd: Int32, name: String, limit: Int) throws(InputReadError) -> [UInt8] {
        var st = stat()
        var capacity = 1 << 16
        if fstat(fd, &st) == 0 {
            if (st.st_mode & S_IFMT) == S_IFDIR { throw .isDirectory(name: name) }
            if (st.st_mode & S_IFMT) == S_IFREG {
                if Int(st.st_size) > limit { throw .tooLarge(name: name, limit: limit) }
                capacity = Int(st.st_size) + 1  // +1 sees end-of-file without growing
            }
        }
        capacity = max(1, min(capacity, limit &+ 1))
        var buffer: [UInt8]
        var used = 0
        if capacity > 1 << 16 {
            // A sized regular file: read into uninitialized memory (zero-filling 100 MB first costs as much as
            // a tenth of parsing it). Anything past the size it had is read below, into a grown buffer.
            var failure: InputReadError? = nil
            buffer = [UInt8](unsafeUninitializedCapacity: capacity) { raw, count in
                while used < raw.count {
                    let n = read(fd, raw.baseAddress! + used, raw.count - used)
                    if n < 0 {
                        let code = errno
                        if code == EINTR { continue }
                        failure = code == EISDIR ? .isDirectory(name: name) : .failed(name: name, reason: String(cString: strerror(code)))
                        break
                    }
                    if n == 0 { break }
                    used += n
                }
                count = used
            }
            if let failure { throw failure }
            if used < capacity { return buffer }
            if used > limit { throw .tooLarge(name: name, limit: limit) }
        } else {
            buffer = [UInt8](repeating: 0, count: capacity)
        }
        while true {
            if used == buffer.count {
                if used > limit { throw .tooLarge(name: name, limit: limit) }
                let grown = min(buffer.count * 2, limit &+ 1)
                buffer.append(contentsOf: repeatElement(0, count: grown - buffer.count))
            }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + used, $0.count - used) }
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                if code == EISDIR { throw .isDirectory(name: name) }
                throw .failed(name: name, reason: String(cString: strerror(code)))
            }
            if n == 0 { break }
            used += n
            if used > limit { throw .tooLarge(name: name, limit: limit) }
        }
        buffer.removeSubrange(used...)
        return buffer
    }

    /// "1 GiB", "512 MiB", "1000 bytes": the unit the number is a whole multiple of.
    public static func describe(bytes: Int) -> String {
        for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] where bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift) \(unit)"
        }
        return "\(bytes) bytes"
    }
}
