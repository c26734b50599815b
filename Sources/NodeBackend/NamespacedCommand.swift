/// Runs node tools inside the target network namespace: `nsenter --net=<path> -- <tool> …`. A child process
/// cannot be told which namespace to use otherwise (iptables has no such option), and nsenter only enters
/// the network namespace, so the tool still sees this process's mounts and `/run/xtables.lock`.
struct NamespacedCommand: Sendable {
    let context: NodeContext

    /// Runs `tool` (looked up by name) with `arguments`; throws 69 naming the tool when it is missing.
    func run(_ tool: String, _ arguments: [String], stdin: String = "", stdinChunks: (() -> [UInt8]?)? = nil,
             package: String) throws(NodeError) -> ProcessOutput {
        guard let path = ProcessRunner.find(tool) else {
            throw .unavailable("\(tool) is not installed (package \(package)); it is needed to work with \(context.place)")
        }
        var executable = path
        var argv = arguments
        if let ns = context.netns {
            guard let nsenter = ProcessRunner.find("nsenter") else {
                throw .unavailable("nsenter is not installed (package util-linux); it is needed to run \(tool) in \(context.place)")
            }
            executable = nsenter
            argv = ["--net=\(ns.path)", "--", path] + arguments
        }
        let out: ProcessOutput
        do {
            out = try ProcessRunner.run(executable, argv, stdin: stdin, stdinChunks: stdinChunks)
        } catch {
            throw .unavailable("cannot start \(executable): \(errnoString(error.errno))")
        }
        if context.netns != nil && out.status != 0 && out.stderr.contains("nsenter:") {
            let msg = out.stderr.trimmed
            if msg.contains("Operation not permitted") || msg.contains("Permission denied") {
                throw .noPermissionToEnter("entering \(context.place)", detail: msg)
            }
            if msg.contains("No such file") || msg.contains("Invalid argument") {
                throw .refused("\(context.place) cannot be entered: \(msg)")
            }
        }
        return out
    }
}

extension String {
    var trimmed: String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s = s.dropFirst() }
        while let l = s.last, l.isWhitespace { s = s.dropLast() }
        return String(s)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

func errnoString(_ e: Int32) -> String {
    String(cString: strerror(e)) + " (errno \(e))"
}
