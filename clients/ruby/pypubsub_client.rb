#!/usr/bin/env ruby
# frozen_string_literal: true

# A PyPubSub client that survives real networks. Ruby standard library only.
#
# Owns reading a PyPubSub stream and keeping it alive: records ("JSON\n", one per HTTP chunk,
# but TCP may merge several into one read or split one over reads) are line-buffered; a line
# longer than max_line is skipped without being held; pings are hidden unless asked for;
# silence longer than +timeout+ means a dead path and triggers a reconnect; reconnects back
# off exponentially with full jitter and resume with X-Fetch-Since-Cursor from the last
# pubsub_cursor seen.
#
#   require_relative 'pypubsub_client'
#   client = PyPubSub::Client.new('http://localhost:2069/commits', user: 'u', password: 'p')
#   client.listen { |event| p event }      # blocks; client.close from another thread stops it
#
# CLI:  ruby pypubsub_client.rb listen URL [--user U] [--since EPOCH] [--pretty]
#       ruby pypubsub_client.rb publish URL '{"json": 1}' [--user U]
# The password for --user comes from $PUBSUB_PASSWORD.

require 'json'
require 'net/http'
require 'openssl'
require 'zlib'
require 'uri'
require 'optparse'

module PyPubSub
  VERSION = '1.0.0'
  USER_AGENT = "pypubsub-client/#{VERSION} (ruby)"
  # The server pings every 5 s by default: three missed pings and some slack mean a dead path.
  DEFAULT_TIMEOUT = 16.0
  # A record longer than this is skipped (the daemon's default payload limit is 100 KiB).
  DEFAULT_MAX_LINE = 1024 * 1024
  # First backoff step and cap, in seconds; each delay is uniform in [0, step] ("full jitter").
  DEFAULT_BACKOFF_BASE = 1.0
  DEFAULT_BACKOFF_CAP = 60.0
  # A cursor is opaque, but it goes back into a request header: visible ASCII, bounded.
  CURSOR_RE = /\A[\x21-\x7e]{1,256}\z/.freeze

  # The server answered with a status other than 200.
  class HTTPError < StandardError
    attr_reader :status

    def initialize(status, message)
      super("HTTP #{status}: #{message}")
      @status = status
    end

    def retryable?
      status >= 500 || [408, 429].include?(status)
    end
  end

  # Turns arbitrary slices of a byte stream into complete lines (without "\n").
  class LineBuffer
    attr_reader :skipped

    def initialize(max_line = DEFAULT_MAX_LINE)
      @max_line = max_line
      @buf = String.new(encoding: Encoding::BINARY)
      @discarding = false
      @skipped = 0
    end

    def feed(data)
      data = data.b
      lines = []
      start = 0
      while (nl = data.index("\n", start))
        len = @buf.bytesize + nl - start
        if @discarding
          @discarding = false
        elsif len > @max_line
          skip(len)
        else
          @buf << data.byteslice(start, nl - start)
          lines << @buf.dup
        end
        @buf.clear
        start = nl + 1
      end
      unless @discarding
        @buf << data.byteslice(start, data.bytesize - start)
        if @buf.bytesize > @max_line
          skip(@buf.bytesize)
          @buf.clear
          @discarding = true
        end
      end
      lines
    end

    private

    def skip(size)
      @skipped += 1
      warn "pypubsub-client: skipping a record of at least #{size} bytes (max_line #{@max_line})"
    end
  end

  # Exponential backoff with full jitter; reset after a connection that delivered data.
  class Backoff
    attr_reader :attempt

    def initialize(base = DEFAULT_BACKOFF_BASE, cap = DEFAULT_BACKOFF_CAP)
      @base = base
      @cap = cap
      @attempt = 0
    end

    def next_delay
      step = [@cap, @base * (2**[@attempt, 32].min)].min
      @attempt += 1
      rand * step
    end

    def reset
      @attempt = 0
    end
  end

  # The JSON object in one line, or nil (blank, NUL-only, not JSON, not an object).
  def self.parse_record(line)
    text = line.b.sub(/\A[\0\s]+/n, '').sub(/[\0\s]+\z/n, '').force_encoding(Encoding::UTF_8)
    return nil if text.empty?

    unless text.valid_encoding?
      warn 'pypubsub-client: skipping a record that is not UTF-8'
      return nil
    end

    obj = JSON.parse(text)
    return obj if obj.is_a?(Hash)

    warn 'pypubsub-client: skipping a record that is not a JSON object'
    nil
  rescue JSON::ParserError => e
    warn "pypubsub-client: skipping a record that is not JSON (#{e.message[0, 80]})"
    nil
  end

  # A subscription that keeps itself alive.
  class Client
    attr_reader :cursor, :connections, :skipped

    def initialize(url, user: nil, password: nil, since: nil, cursor: nil, pings: false,
                   timeout: DEFAULT_TIMEOUT, max_line: DEFAULT_MAX_LINE,
                   backoff_base: DEFAULT_BACKOFF_BASE, backoff_cap: DEFAULT_BACKOFF_CAP,
                   headers: {}, verbose: false)
      @uri = URI(url)
      raise ArgumentError, "not an http(s) URL: #{url}" unless %w[http https].include?(@uri.scheme)

      @user = user
      @password = password
      @since = since
      @cursor = cursor
      @pings = pings
      @timeout = timeout
      @max_line = max_line
      @backoff = Backoff.new(backoff_base, backoff_cap)
      @headers = headers
      @verbose = verbose
      @connections = 0
      @skipped = 0
      @closed = false
      @http = nil
      @lock = Mutex.new
      @wake = ConditionVariable.new
    end

    # Stop listening (from another thread or from the block).
    def close
      @closed = true
      @lock.synchronize { @wake.broadcast }
      http = @http
      http&.finish if http&.started?
    rescue IOError
      nil # already finished
    end

    # Call the block with each event (and each ping when pings: true) until close is called or
    # the server refuses the subscription (HTTPError).
    def listen(&block)
      until @closed
        delivered = false
        begin
          stream { |ev| delivered = true unless ev.key?('stillalive'); block.call(ev) }
          log 'stream ended'
        rescue HTTPError => e
          raise unless e.retryable?

          log e.message
        rescue Net::ReadTimeout
          log "no data for #{@timeout}s"
        rescue IOError, SystemCallError, SocketError, Net::OpenTimeout, Net::HTTPBadResponse,
               Net::ProtocolError, OpenSSL::SSL::SSLError, EOFError, Zlib::Error => e
          log "connection lost: #{e.class}: #{e.message}" unless @closed
        ensure
          @http = nil
        end
        break if @closed

        @backoff.reset if delivered
        delay = @backoff.next_delay
        log format('reconnecting in %.2fs', delay)
        wait(delay)
      end
    end

    private

    def log(msg)
      warn "pypubsub-client: #{msg}" if @verbose || !msg.start_with?('connected')
    end

    def wait(seconds)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
      until @closed
        left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
        break if left <= 0

        @lock.synchronize { @wake.wait(@lock, left) unless @closed }
      end
    end

    def request
      req = Net::HTTP::Get.new(@uri.request_uri.empty? ? '/' : @uri.request_uri)
      req['User-Agent'] = USER_AGENT
      req['Accept'] = '*/*'
      req.basic_auth(@user, @password || '') if @user
      if @cursor
        req['X-Fetch-Since-Cursor'] = @cursor
      elsif @since
        req['X-Fetch-Since'] = @since.to_i.to_s
      end
      @headers.each { |k, v| req[k] = v }
      req
    end

    def stream
      asked = @cursor
      http = Net::HTTP.new(@uri.host, @uri.port)
      http.use_ssl = @uri.scheme == 'https'
      http.open_timeout = 10
      # Net::HTTP retries an idempotent GET once on its own: we retry (with backoff and cursor)
      http.max_retries = 0
      # Net::HTTP's read timeout applies to every read: silence beyond it raises ReadTimeout.
      http.read_timeout = @timeout
      @http = http
      http.start do
        http.request(request) do |res|
          raise HTTPError.new(res.code.to_i, res.message) unless res.code == '200'

          return if @closed

          @connections += 1
          if asked && res['X-Fetch-Since-Cursor-Found'] == 'false'
            warn "pypubsub-client: the server no longer holds cursor #{asked}: events may have been missed"
          end
          log(asked ? "connected (resuming after #{asked})" : 'connected')
          lines = LineBuffer.new(@max_line)
          begin
            res.read_body do |chunk|
              lines.feed(chunk).each do |line|
                ev = PyPubSub.parse_record(line)
                next if ev.nil?

                if ev.key?('stillalive') && ev.size == 1
                  yield ev if @pings
                  next
                end
                cur = ev['pubsub_cursor']
                @cursor = cur if cur.is_a?(String) && CURSOR_RE.match?(cur)
                yield ev
              end
            end
          ensure
            @skipped += lines.skipped
          end
        end
      end
    end
  end

  # Publish a JSON object; returns [status, text]; raises HTTPError on a non-2xx answer.
  def self.publish(url, obj, user: nil, password: nil, method: 'PUT', timeout: 30)
    uri = URI(url)
    req = (method.upcase == 'POST' ? Net::HTTP::Post : Net::HTTP::Put).new(uri.request_uri)
    req['Content-Type'] = 'application/json'
    req['User-Agent'] = USER_AGENT
    req.basic_auth(user, password || '') if user
    req.body = JSON.generate(obj)
    res = Net::HTTP.start(uri.host, uri.port, use_ssl: uri.scheme == 'https',
                                              open_timeout: timeout, read_timeout: timeout) do |http|
      http.request(req)
    end
    raise HTTPError.new(res.code.to_i, res.body.to_s.strip) unless res.code.start_with?('2')

    [res.code.to_i, res.body.to_s]
  end

  def self.main(argv)
    opts = { pretty: false, pings: false, verbose: false }
    parser = OptionParser.new do |o|
      o.banner = "usage: ruby pypubsub_client.rb listen URL [options]\n" \
                 "       ruby pypubsub_client.rb publish URL JSON [--user U]\n" \
                 '(the password for --user is read from $PUBSUB_PASSWORD)'
      o.on('--user U') { |v| opts[:user] = v }
      o.on('--since EPOCH', Float) { |v| opts[:since] = v }
      o.on('--cursor C') { |v| opts[:cursor] = v }
      o.on('--pretty') { opts[:pretty] = true }
      o.on('--pings') { opts[:pings] = true }
      o.on('--timeout S', Float) { |v| opts[:timeout] = v }
      o.on('--max-line N', Integer) { |v| opts[:max_line] = v }
      o.on('--backoff S', Float) { |v| opts[:backoff_base] = v }
      o.on('--backoff-cap S', Float) { |v| opts[:backoff_cap] = v }
      o.on('--method M') { |v| opts[:method] = v }
      o.on('-v', '--verbose') { opts[:verbose] = true }
    end
    cmd, url, json = parser.parse(argv)
    unless url && %w[listen publish].include?(cmd) && (cmd == 'listen' || json)
      warn parser.banner
      return 2
    end
    password = opts[:user] ? ENV.fetch('PUBSUB_PASSWORD', '') : nil
    if opts[:user] && password.empty?
      # running anonymous instead would silently show only public events
      warn "pypubsub_client: --user #{opts[:user]} needs a password: set $PUBSUB_PASSWORD"
      return 2
    end
    if cmd == 'publish'
      begin
        obj = JSON.parse(json)
      rescue JSON::ParserError => e
        warn "not JSON: #{e.message}"
        return 2
      end
      begin
        status, text = publish(url, obj, user: opts[:user], password: password, method: opts[:method] || 'PUT')
      rescue HTTPError, SystemCallError, IOError, SocketError => e
        warn e.message
        return 1
      end
      puts "#{status} #{text.strip}"
      return 0
    end
    kw = opts.slice(:user, :since, :cursor, :pings, :timeout, :max_line, :backoff_base, :backoff_cap, :verbose)
    client = Client.new(url, password: password, **kw)
    %w[INT TERM].each { |sig| trap(sig) { Thread.new { client.close } } }
    $stdout.sync = true
    client.listen do |ev|
      puts(opts[:pretty] ? JSON.pretty_generate(ev) : JSON.generate(ev))
    end
    0
  rescue HTTPError => e
    warn e.message
    1
  rescue Errno::EPIPE
    0
  end
end

exit(PyPubSub.main(ARGV)) if $PROGRAM_NAME == __FILE__
